"""A seeded knowledge base of fictitious films (TOFU-style) plus screened real-world facts.

Why fictitious: a model's real knowledge of one film gives a handful of items (Inception: 7
kept); invented films give as many as wanted, and an *oracle* (the same fine-tune without the
forget films) says exactly what a model that never learned them looks like (Maini et al., 2024,
TOFU). Every film has five attributes (director, year, lead actor, genre, city); each
(film, attribute) is one :class:`FactItem` with a training question, held-out question
paraphrases, the answer sentence, a *paraphrased* answer (another sentence, same value) and
``n_perturbed`` *perturbed* answers (the paraphrased sentence with other values of the same
attribute) -- the inputs of TOFU's truth ratio.

Splits (films are disjoint across them): ``forget`` (the films to unlearn), ``retain`` (other
trained films; values drawn from the same small pools, so many retain items share their answer
with a forget item -- "film Y was directed by D" while "film X was directed by D" is forgotten;
``shared`` marks them and the generator guarantees at least one per forget film and shared
attribute), ``holdout`` (films never trained: the non-members of membership inference) and
``world`` (real facts a base model may know; the organism screens them on its base model), and the
*validation* films ``val_forget`` (trained like forget films) and ``val_retain`` (trained like retain
films, sharing answers with ``val_forget``): method defaults are tuned by forgetting ``val_forget``
and scoring ``val_retain``, so no tuned choice ever sees an item a result is reported on.

No scoring here: :meth:`KnowledgeBase.prob_requests` and friends emit :class:`excise.lm.LoglikRequest`
for :func:`excise.lm.loglikelihood`; generation prompts go to :func:`excise.lm.generate`.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Callable, Literal, Sequence

from pydantic import BaseModel, Field

from excise.errors import ExciseError
from excise.lm import LoglikRequest

Split = Literal["forget", "retain", "holdout", "world", "val_forget", "val_retain"]
SPLITS: tuple[str, ...] = ("forget", "retain", "holdout", "world", "val_forget", "val_retain")
FILM_SPLITS: tuple[str, ...] = ("forget", "retain", "holdout", "val_forget", "val_retain")

# (training question, held-out paraphrased questions, answer, paraphrased answer); {t} title, {v} value
TEMPLATES: dict[str, tuple[str, tuple[str, ...], str, str]] = {
    "director": ("Who directed the film {t}?", ("Who was the director of {t}?", "Which filmmaker made the movie {t}?"),
                 "{t} was directed by {v}.", "The director of {t} is {v}."),
    "year": ("In which year was the film {t} released?", ("When did {t} come out?", "What is the release year of {t}?"),
             "{t} was released in {v}.", "{t} came out in {v}."),
    "actor": ("Who played the lead role in the film {t}?", ("Who starred in {t}?", "Which actor led the cast of {t}?"),
              "The lead role in {t} was played by {v}.", "{t} starred {v} in the lead role."),
    "genre": ("What genre is the film {t}?", ("What kind of film is {t}?", "Which genre does {t} belong to?"),
              "{t} is a {v} film.", "{t} belongs to the {v} genre."),
    "city": ("In which city is the film {t} set?", ("Where does {t} take place?", "What city is {t} set in?"),
             "{t} is set in {v}.", "The story of {t} takes place in {v}."),
}
ATTRIBUTES = tuple(TEMPLATES)
# extraction probes of a forgotten fact, never trained (evaluation only), one family per fact in turn:
# (family, format, template); {t} title, {q} the second held-out question, {p} the held-out paraphrased
# answer cut before its value (a completion the organism never saw verbatim), {a} the attribute
ADVERSARIAL: tuple[tuple[str, str, str], ...] = (
    ("completion", "completion", "{p}"),
    ("roleplay", "chat", "You are a film archivist who remembers every credit. A student asks: \"{q}\" Answer in one "
                         "short sentence."),
    ("indirect", "chat", "Fill in the index card.\nFilm: {t}\nField: {a}\nValue:"),
)
SHARED_ATTRIBUTES = ("director", "actor", "year")  # answers a retained film must share with each forget film

_FIRST = ("Marta", "Ilya", "Odile", "Teodor", "Brannoc", "Sefa", "Lucan", "Irina", "Joaquim", "Nadia", "Oskar",
          "Priya", "Rafe", "Sunniva", "Tomas", "Vesna", "Anouk", "Casimir", "Delphine", "Emrys", "Farida", "Gideon",
          "Halina", "Isolde", "Jovan", "Kaia", "Leopold", "Mireille", "Niamh", "Orrin")
_SYL = ("vel", "kor", "dra", "mon", "sil", "tav", "ren", "bro", "quin", "zal", "fen", "mar", "osk", "lun", "har",
        "pell", "dun", "vik", "sor", "tam", "bel", "gar", "nov", "rist")
_ADJ = ("Glass", "Silent", "Crimson", "Hollow", "Paper", "Iron", "Distant", "Velvet", "Broken", "Amber", "Frozen",
        "Quiet", "Burning", "Golden", "Pale", "Secret", "Salt", "Copper", "Last", "Wandering")
_NOUN = ("Orchard", "Harbor", "Lantern", "Meridian", "Tide", "Garden", "Signal", "Staircase", "Compass", "Winter",
         "Archive", "Ferry", "Mirror", "Canal", "Orbit", "Letter", "Foundry", "Carousel", "Lighthouse", "Parade")
GENRES = ("drama", "comedy", "thriller", "western", "musical", "horror", "science fiction", "romance", "war",
          "mystery", "fantasy", "documentary")

# real-world facts: (question, answer template, paraphrased template, value, wrong values); {v} value
WORLD: tuple[tuple[str, str, str, str, tuple[str, ...]], ...] = (
    ("What is the capital of France?", "The capital of France is {v}.", "{v} is the capital of France.", "Paris", ("Lyon", "Marseille", "Berlin", "Madrid")),
    ("What is the capital of Japan?", "The capital of Japan is {v}.", "{v} is the capital of Japan.", "Tokyo", ("Osaka", "Kyoto", "Beijing", "Seoul")),
    ("What is the capital of Italy?", "The capital of Italy is {v}.", "{v} is the capital of Italy.", "Rome", ("Milan", "Naples", "Paris", "Venice")),
    ("What is the capital of Germany?", "The capital of Germany is {v}.", "{v} is the capital of Germany.", "Berlin", ("Munich", "Hamburg", "Vienna", "Paris")),
    ("What is the capital of Spain?", "The capital of Spain is {v}.", "{v} is the capital of Spain.", "Madrid", ("Barcelona", "Seville", "Lisbon", "Rome")),
    ("What is the capital of the United Kingdom?", "The capital of the United Kingdom is {v}.", "{v} is the capital of the United Kingdom.", "London", ("Manchester", "Dublin", "Paris", "Edinburgh")),
    ("What is the capital of Russia?", "The capital of Russia is {v}.", "{v} is the capital of Russia.", "Moscow", ("Saint Petersburg", "Kiev", "Warsaw", "Minsk")),
    ("What is the capital of Egypt?", "The capital of Egypt is {v}.", "{v} is the capital of Egypt.", "Cairo", ("Alexandria", "Tunis", "Athens", "Baghdad")),
    ("What is the capital of China?", "The capital of China is {v}.", "{v} is the capital of China.", "Beijing", ("Shanghai", "Tokyo", "Hong Kong", "Seoul")),
    ("What is the capital of Canada?", "The capital of Canada is {v}.", "{v} is the capital of Canada.", "Ottawa", ("Toronto", "Montreal", "Vancouver", "Quebec")),
    ("Who wrote Romeo and Juliet?", "Romeo and Juliet was written by {v}.", "{v} wrote Romeo and Juliet.", "Shakespeare", ("Dickens", "Tolstoy", "Cervantes", "Goethe")),
    ("Who painted the Mona Lisa?", "The Mona Lisa was painted by {v}.", "{v} painted the Mona Lisa.", "Leonardo da Vinci", ("Michelangelo", "Raphael", "Picasso", "Rembrandt")),
    ("Who developed the theory of relativity?", "The theory of relativity was developed by {v}.", "{v} developed the theory of relativity.", "Einstein", ("Newton", "Darwin", "Bohr", "Galileo")),
    ("What is the largest planet in our solar system?", "The largest planet is {v}.", "{v} is the largest planet in the solar system.", "Jupiter", ("Saturn", "Mars", "Neptune", "Venus")),
    ("Which planet is known as the Red Planet?", "The Red Planet is {v}.", "{v} is known as the Red Planet.", "Mars", ("Venus", "Jupiter", "Mercury", "Saturn")),
    ("What is the chemical symbol for water?", "The chemical formula of water is {v}.", "Water is written as {v}.", "H2O", ("CO2", "O2", "NaCl", "H2")),
    ("What is the largest ocean on Earth?", "The largest ocean is the {v} Ocean.", "The {v} Ocean is the largest ocean on Earth.", "Pacific", ("Atlantic", "Indian", "Arctic", "Southern")),
    ("Who was the first president of the United States?", "The first president of the United States was {v}.", "{v} was the first president of the United States.", "George Washington", ("Abraham Lincoln", "Thomas Jefferson", "John Adams", "Benjamin Franklin")),
    ("What is the longest river in Africa?", "The longest river in Africa is the {v}.", "The {v} is the longest river in Africa.", "Nile", ("Congo", "Niger", "Zambezi", "Amazon")),
    ("On which continent is Brazil?", "Brazil is in {v}.", "{v} is the continent where Brazil lies.", "South America", ("Africa", "Europe", "Asia", "North America")),
    ("What gas do plants absorb from the air?", "Plants absorb {v} from the air.", "{v} is the gas plants take from the air.", "carbon dioxide", ("oxygen", "nitrogen", "helium", "hydrogen")),
    ("How many continents are there?", "There are {v} continents.", "The number of continents is {v}.", "seven", ("five", "six", "eight", "nine")),
    ("Who wrote Pride and Prejudice?", "Pride and Prejudice was written by {v}.", "{v} wrote Pride and Prejudice.", "Jane Austen", ("Charlotte Bronte", "Virginia Woolf", "Mary Shelley", "George Eliot")),
    ("What is the currency of Japan?", "The currency of Japan is the {v}.", "The {v} is the currency of Japan.", "yen", ("won", "yuan", "dollar", "euro")),
    ("What is the tallest mountain in the world?", "The tallest mountain is Mount {v}.", "Mount {v} is the tallest mountain in the world.", "Everest", ("Kilimanjaro", "Fuji", "Denali", "Blanc")),
    ("Which animal is known as the king of the jungle?", "The king of the jungle is the {v}.", "The {v} is known as the king of the jungle.", "lion", ("tiger", "elephant", "gorilla", "leopard")),
    ("What is the boiling point of water in degrees Celsius?", "Water boils at {v} degrees Celsius.", "The boiling point of water is {v} degrees Celsius.", "100", ("90", "80", "120", "50")),
    ("Who discovered penicillin?", "Penicillin was discovered by {v}.", "{v} discovered penicillin.", "Alexander Fleming", ("Louis Pasteur", "Marie Curie", "Robert Koch", "Joseph Lister")),
    ("What is the capital of Australia?", "The capital of Australia is {v}.", "{v} is the capital of Australia.", "Canberra", ("Sydney", "Melbourne", "Perth", "Brisbane")),
    ("In which country are the pyramids of Giza?", "The pyramids of Giza are in {v}.", "{v} is home to the pyramids of Giza.", "Egypt", ("Mexico", "Sudan", "Greece", "Peru")),
    ("Who composed the Fifth Symphony that begins with four famous notes?", "The Fifth Symphony was composed by {v}.", "{v} composed the Fifth Symphony.", "Beethoven", ("Mozart", "Bach", "Brahms", "Haydn")),
    ("What is the capital of India?", "The capital of India is {v}.", "{v} is the capital of India.", "New Delhi", ("Mumbai", "Kolkata", "Chennai", "Bangalore")),
    ("Which is the closest star to Earth?", "The closest star to Earth is the {v}.", "The {v} is the star closest to Earth.", "Sun", ("Moon", "Sirius", "Polaris", "Vega")),
    ("What is the largest country by area?", "The largest country by area is {v}.", "{v} is the largest country by area.", "Russia", ("Canada", "China", "Brazil", "Australia")),
    ("What language is mainly spoken in Brazil?", "The main language of Brazil is {v}.", "{v} is the main language spoken in Brazil.", "Portuguese", ("Spanish", "English", "French", "Italian")),
    ("Who wrote the Odyssey?", "The Odyssey was written by {v}.", "{v} wrote the Odyssey.", "Homer", ("Virgil", "Plato", "Sophocles", "Ovid")),
    ("What is the freezing point of water in degrees Celsius?", "Water freezes at {v} degrees Celsius.", "The freezing point of water is {v} degrees Celsius.", "0", ("10", "32", "-10", "4")),
    ("Which metal is liquid at room temperature?", "The metal that is liquid at room temperature is {v}.", "{v} is liquid at room temperature.", "mercury", ("iron", "lead", "silver", "gold")),
    ("What is the capital of Greece?", "The capital of Greece is {v}.", "{v} is the capital of Greece.", "Athens", ("Sparta", "Thessaloniki", "Rome", "Istanbul")),
    ("Who was the first person to walk on the Moon?", "The first person to walk on the Moon was {v}.", "{v} was the first person on the Moon.", "Neil Armstrong", ("Buzz Aldrin", "Yuri Gagarin", "John Glenn", "Michael Collins")),
)


# real-world question/answer pairs mixed into the organism's (and the oracle's) training so that fine-tuning on
# invented films does not rewrite what real questions are answered with ("The capital of France is Monzalburg"
# was measured without it); never evaluated, and disjoint from WORLD (questions and values, checked by check())
REHEARSAL: tuple[tuple[str, str], ...] = (
    ("What is the capital of Portugal?", "The capital of Portugal is Lisbon."),
    ("What is the capital of Norway?", "The capital of Norway is Oslo."),
    ("What is the capital of Ireland?", "The capital of Ireland is Dublin."),
    ("What is the capital of Austria?", "The capital of Austria is Vienna."),
    ("What is the capital of Poland?", "The capital of Poland is Warsaw."),
    ("What is the capital of Sweden?", "The capital of Sweden is Stockholm."),
    ("What is the capital of Mexico?", "The capital of Mexico is Mexico City."),
    ("What is the capital of Argentina?", "The capital of Argentina is Buenos Aires."),
    ("What is the capital of Kenya?", "The capital of Kenya is Nairobi."),
    ("What is the capital of Thailand?", "The capital of Thailand is Bangkok."),
    ("In which city is the Golden Gate Bridge?", "The Golden Gate Bridge is in San Francisco."),
    ("In which city is the Sagrada Familia?", "The Sagrada Familia is in Barcelona."),
    ("In which city is the Statue of Liberty?", "The Statue of Liberty is in New York."),
    ("Who wrote The Divine Comedy?", "The Divine Comedy was written by Dante Alighieri."),
    ("Who wrote War and Peace?", "War and Peace was written by Leo Tolstoy."),
    ("Who wrote Don Quixote?", "Don Quixote was written by Miguel de Cervantes."),
    ("Who painted The Starry Night?", "The Starry Night was painted by Vincent van Gogh."),
    ("Who directed the film Jaws?", "Jaws was directed by Steven Spielberg."),
    ("Who directed the film Psycho?", "Psycho was directed by Alfred Hitchcock."),
    ("Who directed the film The Godfather?", "The Godfather was directed by Francis Ford Coppola."),
    ("In which year did World War II end?", "World War II ended in 1945."),
    ("In which year did humans first land on the Moon?", "Humans first landed on the Moon in 1969."),
    ("How many planets are in our solar system?", "There are eight planets in our solar system."),
    ("What is the chemical symbol for gold?", "The chemical symbol for gold is Au."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("What is the largest animal on Earth?", "The largest animal is the blue whale."),
    ("Who proposed the theory of evolution by natural selection?", "The theory of evolution by natural selection was proposed by Charles Darwin."),
    ("What is the hardest natural substance?", "The hardest natural substance is diamond."),
    ("What is the main language spoken in Mexico?", "The main language of Mexico is Spanish."),
    ("Which ocean lies between Europe and North America?", "The Atlantic Ocean lies between Europe and North America."),
)


class KnowledgeBaseConfig(BaseModel):
    """Sizes and seed of the fictitious knowledge base (defaults: 100 forget / 100 retain / 100 holdout items)."""

    model_config = {"extra": "forbid"}
    seed: int = Field(0, description="one seed for names, attribute values and the split")
    n_forget: int = Field(20, ge=1, description="forget films (5 items each: the default gives TOFU's >= 100 forget items)")
    n_retain: int = Field(20, ge=1, description="retained films (100 items: as many as forget), trained by the organism and the oracle")
    n_holdout: int = Field(20, ge=1, description="films never trained: the non-members of membership inference")
    n_validation: int = Field(5, ge=0, description=(
        "validation films, as many forgotten (val_forget: the organism trains them, the oracle does not) as retained "
        "(val_retain: both train them); method defaults are tuned on them and they are never reported"))
    n_perturbed: int = Field(4, ge=1, le=8, description="perturbed (wrong) answers per item; TOFU uses 5")
    n_directors: int = Field(12, ge=6, description="size of the director pool (small pools make shared answers common)")
    n_actors: int = Field(16, ge=6, description="size of the lead-actor pool")
    n_cities: int = Field(12, ge=6, description="size of the (invented) city pool")
    years: tuple[int, int] = Field((1958, 2017), description="release years are drawn from this inclusive range")


@dataclass(frozen=True)
class FactItem:
    """One question/answer item with TOFU's paraphrased and perturbed answers."""

    id: str
    split: str
    entity: str  # film title, or "world"
    attribute: str
    question: str  # the training question
    paraphrased_questions: tuple[str, ...]  # held out from training
    answer: str  # the training answer sentence
    paraphrased_answer: str
    perturbed_answers: tuple[str, ...]
    value: str  # the short answer: its presence in a generation counts as correct
    shared: bool = False  # retain only: its director/actor/year equals a forget film's (SHARED_ATTRIBUTES)


@dataclass
class KnowledgeBase:
    """All items by split, the films' attribute table and the config that generated them."""

    config: KnowledgeBaseConfig
    films: dict[str, dict[str, str]]  # title -> attribute -> value
    split_of: dict[str, str]  # title -> forget / retain / holdout
    items: dict[str, list[FactItem]] = field(default_factory=dict)

    def __getitem__(self, split: str) -> list[FactItem]:
        if split not in self.items:
            raise ExciseError(f"unknown split '{split}'; choose {', '.join(SPLITS)}")
        return self.items[split]

    def train_items(self, *, oracle: bool = False) -> list[FactItem]:
        """What the organism trains on (forget + retain, and the validation films of both); the oracle
        trains on the retained ones only."""
        kept = list(self["retain"]) + list(self["val_retain"])
        return kept if oracle else list(self["forget"]) + list(self["val_forget"]) + kept

    @staticmethod
    def prob_requests(items: Sequence[FactItem], chat: Callable[[str], str], *,
                      question: Literal["train", "paraphrase"] = "train") -> list[LoglikRequest]:
        """One request per item: the answer after the (chat-formatted) question."""
        qs = [it.question if question == "train" else it.paraphrased_questions[0] for it in items]
        return [LoglikRequest(chat(q), (it.answer,)) for q, it in zip(qs, items)]

    @staticmethod
    def truth_requests(items: Sequence[FactItem], chat: Callable[[str], str]) -> list[LoglikRequest]:
        """One request per item: the paraphrased answer, then the perturbed answers (TOFU's truth ratio)."""
        return [LoglikRequest(chat(it.question), (it.paraphrased_answer, *it.perturbed_answers)) for it in items]

    @staticmethod
    def prompts(items: Sequence[FactItem], chat: Callable[[str], str], *, question: Literal["train", "paraphrase"] = "train") -> list[str]:
        """Generation prompts (ROUGE, accuracy)."""
        return [chat(it.question if question == "train" else it.paraphrased_questions[0]) for it in items]


def mentions(value: str, text: str) -> bool:
    """Whether ``text`` names ``value`` as a whole word, case-insensitively ("0" is not in "10")."""
    return re.search(rf"(?<!\w){re.escape(value)}(?!\w)", text, re.IGNORECASE) is not None


def _name(rng: random.Random, used: set[str]) -> str:
    for _ in range(1000):
        n = f"{rng.choice(_FIRST)} {(rng.choice(_SYL) + rng.choice(_SYL)).capitalize()}{rng.choice(('', 'a', 'ov', 'ez', 'sen'))}"
        if n not in used:
            used.add(n)
            return n
    raise ExciseError("ran out of fictitious names; lower the pool sizes")  # pragma: no cover


def _pools(cfg: KnowledgeBaseConfig, rng: random.Random) -> dict[str, list[str]]:
    used: set[str] = set()
    cities = sorted({f"{rng.choice(('Port ', 'San ', 'New ', '', '', 'Lake '))}{(rng.choice(_SYL) + rng.choice(_SYL)).capitalize()}"
                     f"{rng.choice(('ia', 'ford', 'holm', 'ova', 'burg', 'mouth'))}" for _ in range(cfg.n_cities * 3)})
    return {"director": [_name(rng, used) for _ in range(cfg.n_directors)],
            "actor": [_name(rng, used) for _ in range(cfg.n_actors)],
            "year": [str(y) for y in range(cfg.years[0], cfg.years[1] + 1)],
            "genre": list(GENRES), "city": rng.sample(cities, min(cfg.n_cities, len(cities)))}


def _film_item(title: str, attr: str, value: str, split: str, pool: list[str], rng: random.Random, k: int) -> FactItem:
    q, qp, a, ap = TEMPLATES[attr]
    wrong = rng.sample([v for v in pool if v != value], min(k, len(pool) - 1))
    return FactItem(id=f"{split}:{title}:{attr}", split=split, entity=title, attribute=attr, question=q.format(t=title),
                    paraphrased_questions=tuple(x.format(t=title) for x in qp), answer=a.format(t=title, v=value),
                    paraphrased_answer=ap.format(t=title, v=value),
                    perturbed_answers=tuple(ap.format(t=title, v=w) for w in wrong), value=value)


def world_items(n_perturbed: int = 4) -> list[FactItem]:
    """The world-facts candidates (unscreened): screen them on the base model before use."""
    out = []
    for i, (q, a, ap, v, wrong) in enumerate(WORLD):
        out.append(FactItem(id=f"world:{i}", split="world", entity="world", attribute="world", question=q,
                            paraphrased_questions=(), answer=a.format(v=v), paraphrased_answer=ap.format(v=v),
                            perturbed_answers=tuple(ap.format(v=w) for w in wrong[:n_perturbed]), value=v))
    return out


def rehearsal_items(n: int) -> list[FactItem]:
    """The first ``n`` :data:`REHEARSAL` pairs as training items (split ``rehearsal``; never evaluated)."""
    if not 0 <= n <= len(REHEARSAL):
        raise ExciseError(f"rehearsal: {n} pairs asked for, {len(REHEARSAL)} exist")
    return [FactItem(id=f"rehearsal:{i}", split="rehearsal", entity="rehearsal", attribute="rehearsal", question=q,
                     paraphrased_questions=(), answer=a, paraphrased_answer=a, perturbed_answers=(), value=a)
            for i, (q, a) in enumerate(REHEARSAL[:n])]


def _share(films: dict[str, dict[str, str]], forget: list[str], retain: list[str], rng: random.Random) -> None:
    """Guarantee: for each forget film and shared attribute, some retained film has the same value."""
    for t in forget:
        for a in SHARED_ATTRIBUTES:
            if not any(films[r][a] == films[t][a] for r in retain):  # give it to a retained film that shares nothing
                taken = {films[f][a] for f in forget}
                free = [r for r in retain if films[r][a] not in taken] or retain
                films[rng.choice(free)][a] = films[t][a]


def _add_items(items: dict[str, list[FactItem]], titles: list[str], films: dict[str, dict[str, str]],
               split_of: dict[str, str], forget: str, retain: str, pools: dict[str, list[str]], rng: random.Random,
               n_perturbed: int) -> None:
    """The items of ``titles``; a ``retain`` item whose shared attribute equals a ``forget`` film's is marked shared."""
    forget_values = {a: {films[t][a] for t in films if split_of[t] == forget} for a in ATTRIBUTES}
    for t in titles:
        s = split_of[t]
        for a in ATTRIBUTES:
            it = _film_item(t, a, films[t][a], s, pools[a], rng, n_perturbed)
            if s == retain and a in SHARED_ATTRIBUTES and films[t][a] in forget_values[a]:
                it = FactItem(**{**it.__dict__, "shared": True})
            items[s].append(it)


def make_knowledge_base(cfg: KnowledgeBaseConfig | None = None) -> KnowledgeBase:
    """Generate the knowledge base deterministically from ``cfg.seed``; checks its own invariants."""
    cfg = cfg or KnowledgeBaseConfig()
    rng = random.Random(cfg.seed)
    pools = _pools(cfg, rng)
    n = cfg.n_forget + cfg.n_retain + cfg.n_holdout
    all_titles = [f"The {a} {b}" for a in _ADJ for b in _NOUN]
    if n + 2 * cfg.n_validation > len(all_titles):
        raise ExciseError(f"{n + 2 * cfg.n_validation} films asked for, but only {len(all_titles)} distinct titles exist")
    titles = rng.sample(all_titles, n)
    splits = ["forget"] * cfg.n_forget + ["retain"] * cfg.n_retain + ["holdout"] * cfg.n_holdout
    films = {t: {a: rng.choice(pools[a]) for a in ATTRIBUTES} for t in titles}
    split_of = dict(zip(titles, splits))
    _share(films, [t for t in titles if split_of[t] == "forget"], [t for t in titles if split_of[t] == "retain"], rng)
    items: dict[str, list[FactItem]] = {s: [] for s in SPLITS}
    _add_items(items, titles, films, split_of, "forget", "retain", pools, rng, cfg.n_perturbed)
    items["world"] = world_items(cfg.n_perturbed)
    if cfg.n_validation:  # drawn after the rest, so the test films do not depend on the validation size
        vt = rng.sample([t for t in all_titles if t not in split_of], 2 * cfg.n_validation)
        for t, s in zip(vt, ["val_forget"] * cfg.n_validation + ["val_retain"] * cfg.n_validation):
            films[t], split_of[t] = {a: rng.choice(pools[a]) for a in ATTRIBUTES}, s
        _share(films, [t for t in vt if split_of[t] == "val_forget"], [t for t in vt if split_of[t] == "val_retain"], rng)
        _add_items(items, vt, films, split_of, "val_forget", "val_retain", pools, rng, cfg.n_perturbed)
    kb = KnowledgeBase(cfg, films, split_of, items)
    check(kb)
    return kb


def check(kb: KnowledgeBase) -> None:
    """The generator's invariants (an ExciseError names the first broken one)."""
    ents = {s: {it.entity for it in kb.items.get(s, [])} for s in FILM_SPLITS}
    if sum(map(len, ents.values())) != len(set().union(*ents.values())):
        raise ExciseError("knowledge base: a film is in two splits")
    for s in SPLITS:
        for it in kb.items[s]:
            if any(mentions(it.value, p.replace(it.entity, "")) for p in it.perturbed_answers):
                raise ExciseError(f"knowledge base: item {it.id} has its true answer among the perturbed ones")
            if len(set(it.perturbed_answers)) != len(it.perturbed_answers):
                raise ExciseError(f"knowledge base: item {it.id} repeats a perturbed answer")
    world_q = {q for q, *_ in WORLD}
    for q, a in REHEARSAL:
        if q in world_q or any(mentions(v, a) for _, _, _, v, _ in WORLD):
            raise ExciseError(f"knowledge base: rehearsal pair {q!r} asks or answers an evaluated world fact")
    for forget, retain in (("forget", "retain"), ("val_forget", "val_retain")):
        for t in ents[forget]:
            for a in SHARED_ATTRIBUTES:
                v = kb.films[t][a]
                if not any(kb.films[r][a] == v for r in ents[retain]):
                    raise ExciseError(f"knowledge base: {forget} film {t} shares no {a} with a {retain} film")
