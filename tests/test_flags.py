"""Every numeric flag of every script, walked with 0 and -1: each value is either refused before any work starts, with
one line that names the flag (argparse's exit status 2), or its meaning is written in the flag's help ("0 means ...",
"-1 means ...", or "any integer" for a seed). The flags are read from each script's make_parser(), so a flag added
later is walked too."""
import argparse
import importlib
import re

import pytest

SCRIPTS = ["collectives", "data_pipeline", "data_mixing", "zero", "tensor_parallel", "pipeline_parallel", "parallel_3d",
           "expert_parallel", "fsdp_train", "muon", "mixed_precision"]


def numeric_flags(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    flags = []
    for action in parser._actions:
        if not action.option_strings or action.nargs == 0 or isinstance(action.default, bool):
            continue
        if action.type in (int, float) or isinstance(action.default, (int, float)):
            flags.append(action)
    return flags


def documented(action: argparse.Action, value: str) -> bool:
    text = action.help or ""
    return bool(re.search(rf"(^|[\s(]){re.escape(value)} means|any integer", text))


def cases():
    for name in SCRIPTS:
        for action in numeric_flags(importlib.import_module(name).make_parser()):
            for value in ("0", "-1"):
                if not documented(action, value):
                    yield pytest.param(name, action.option_strings[-1], value, id=f"{name} {action.option_strings[-1]} {value}")


@pytest.mark.parametrize("script,flag,value", list(cases()))
def test_numeric_flag_is_refused_in_one_line(script, flag, value, capsys):
    main = importlib.import_module(script).main
    with pytest.raises(SystemExit) as exit_info:
        main([f"{flag}={value}"])
    assert exit_info.value.code == 2, f"{script} {flag}={value} exited {exit_info.value.code}, not with a usage error"
    err = capsys.readouterr().err.strip().splitlines()
    assert err and flag in err[-1], f"{script} {flag}={value}: the error does not name the flag: {err[-1:]}"


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_flag_has_help(script):
    missing = [a.option_strings[-1] for a in importlib.import_module(script).make_parser()._actions
               if a.option_strings and not a.help and a.dest != "help"]
    assert missing == []
