"""ldm.errors.OneLineArgumentParser, the one argparse parser: a bad command line is one line on stderr naming the
problem and `PROG --help`, exit code 2, like every other bad input, in every command that uses it."""

from __future__ import annotations

import pytest

from ldm.errors import OneLineArgumentParser, UserError, exit_on_user_error


def test_a_bad_argument_is_a_user_error_naming_the_help():
    parser = OneLineArgumentParser(prog="ldm-x")
    parser.add_argument("path")
    parser.add_argument("--steps", type=int)
    with pytest.raises(UserError, match=r"^the following arguments are required: path \(see ldm-x --help\)$"):
        parser.parse_args([])
    with pytest.raises(UserError, match=r"^argument --steps: invalid int value: 'many' \(see ldm-x --help\)$"):
        parser.parse_args(["p", "--steps", "many"])
    with pytest.raises(UserError, match=r"^unrecognized arguments: --nope \(see ldm-x --help\)$"):
        parser.parse_args(["p", "--nope"])
    assert parser.parse_args(["p", "--steps", "3"]).steps == 3


def test_plain_argparse_would_print_a_usage_block(capsys):
    # what this parser replaces: the test above can fail
    import argparse

    parser = argparse.ArgumentParser(prog="ldm-x")
    parser.add_argument("path")
    with pytest.raises(SystemExit):
        parser.parse_args([])
    assert capsys.readouterr().err.count("\n") > 1


def _train_main(argv):
    from ldm.training.args import parse_train_args
    from ldm.vae.config import VAEConfig

    return exit_on_user_error(lambda: parse_train_args(VAEConfig, argv, "train a VAE"))()


def _commands():
    from ldm.convert import main as convert
    from ldm.demo.new_color import main as new_color
    from ldm.demo.shapes import main as shapes
    from ldm.latents.shard_writer import main as shard_writer
    from ldm.serve.cli import main as serve
    from ldm.text.tiny import main as tiny

    return {
        "ldm-convert": (convert, ["only-one"]),
        "ldm-serve": (serve, ["--port", "eighty"]),
        "ldm-latent-shards": (shard_writer, []),
        "ldm-tiny-text-encoder": (tiny, ["--layers", "2"]),
        "python -m ldm.demo.new_color": (new_color, ["out", "--color", "ultraviolet"]),
        "ldm-shapes": (shapes, ["out"]),
        "train": (_train_main, ["--bogus"]),
    }


@pytest.mark.parametrize("prog", ["ldm-convert", "ldm-serve", "ldm-latent-shards", "ldm-tiny-text-encoder",
                                  "python -m ldm.demo.new_color", "ldm-shapes", "train"])
def test_every_command_reports_a_bad_command_line_in_one_line(prog, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main, argv = _commands()[prog]
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    if prog != "train":  # the training scripts' prog is the script's file name
        assert err.endswith(f" (see {prog} --help)\n"), err
    else:
        assert err.startswith("error: unrecognized arguments: --bogus (see "), err
    assert list(tmp_path.iterdir()) == []
