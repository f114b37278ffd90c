"""What several commands share: a run configuration from a preset, a config file and key=value
settings; the options of commands that load a model; flags given, by parameter name."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..devices import PRECISIONS
from ..errors import ArgumentError
from ..sampling.compiled import COMPILE_CHOICES, COMPILE_MODES


def load_config_file(path: str) -> dict:
    try:
        values = json.loads(Path(path).read_text())
    except OSError:
        raise ArgumentError(f"cannot read the config file {path}") from None
    except json.JSONDecodeError as error:
        raise ArgumentError(f"{path} is not valid JSON ({error})") from None
    if not isinstance(values, dict):
        raise ArgumentError(f"the config file {path} must hold a JSON object with model, data and train sections, "
                            f"not a {type(values).__name__}")
    return values


def run_configuration(args):
    """The preset (default text-small), with the config file's sections laid over it, then the
    key=value overrides."""
    from ..presets import preset
    from ..runs import RunConfig

    values = preset(args.preset or "text-small").to_dict()
    if args.config:
        for section, fields in load_config_file(args.config).items():
            if not isinstance(fields, dict):
                raise ArgumentError(f"the config file's {section!r} section must be an object")
            if section == "model" and fields.get("kind", values["model"]["kind"]) != values["model"]["kind"]:
                values["model"] = fields
            else:
                values.setdefault(section, {}).update(fields)
    return RunConfig.from_dict(values).with_overrides(args.overrides)


def add_loading_options(parser: argparse.ArgumentParser, precision_note: str = "", samples: bool = True) -> None:
    """The options of every command that loads a model to run it: which weights, where, how precise,
    and (`samples`: for a command that samples) whether the sampling network is compiled."""
    parser.add_argument("--weights", choices=("ema", "raw"), help="a run's average or raw weights (default: the "
                                                                   "average where there is one)")
    parser.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda or cuda:N")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="auto: bf16 autocast on a GPU, float32 on a CPU" + precision_note)
    if samples:
        parser.add_argument("--compile", choices=COMPILE_CHOICES, default="eager", metavar="MODE",
                            help="sample through torch.compile: eager (the default) or a mode, "
                                 f"{', '.join(COMPILE_MODES)} (PGM, MDLM, MaskGIT; the first samples compile)")


def given(args, **names) -> dict:
    """{parameter: value} of the flags given on the command line (flag name -> parameter name)."""
    return {parameter: getattr(args, flag) for parameter, flag in names.items() if getattr(args, flag) is not None}


def check_counts(args, **minimums) -> None:
    """Refuse, before any work, a flag's integer (or any of a list of them) below its minimum."""
    for flag, minimum in minimums.items():
        value = getattr(args, flag, None)
        for item in value if isinstance(value, list) else [value]:
            if item is not None and item < minimum:
                raise ArgumentError(f"--{flag.replace('_', '-')} must be at least {minimum}, got {item}")
