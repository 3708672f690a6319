"""Command groups of the CLI (one module per workflow); options shared by every group live here."""

import typer

SET = typer.Option([], "--set", help="dotted override of any setting, e.g. --set finetune.lora.r=16 "
                   "(repeatable; values are YAML; the typed config validates the result)")
