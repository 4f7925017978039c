"""docs/sync.md against the code: its endpoints, commands, options and config block exist."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from slipstream.shardsync.server import ServerSettings, create_app
from slipstream.shardsync.tokens import TokenVerifier
from slipstream.worker.cli import main
from slipstream.worker.config import parse_config

DOC = (Path(__file__).parent.parent / "docs" / "sync.md").read_text()


def test_every_endpoint_the_doc_names_is_served():
    app = create_app(ServerSettings(dsn="", verifier=TokenVerifier("k" * 32)))
    served = {route.path for route in app.routes}
    named = set(re.findall(r"GET (/[\w/]+)", DOC))
    assert named and named <= served
    assert served - {"/healthz"} <= named  # and every endpoint is documented


def test_every_command_and_option_the_doc_shows_exists():
    for line in re.findall(r"slipstream (?:token|shard|serve|compact)[^`\n]*", DOC):
        words = line.split()
        group, rest = main, words[1:]
        while rest and hasattr(group, "commands") and rest[0] in group.commands:
            group, rest = group.commands[rest[0]], rest[1:]
        assert not hasattr(group, "commands"), line
        options = {o for p in group.params for o in getattr(p, "opts", [])}
        for word in (w.strip("[]") for w in rest):
            if word.startswith("-"):
                assert word in options, (line, word)


def test_the_config_block_is_a_valid_sync_section():
    block = next(b for b in re.findall(r"```toml\n(.*?)```", DOC, re.DOTALL) if "[sync]" in b)
    cfg = parse_config({**tomllib.loads(block), "source": {"dsn": "postgresql://x/y"}})
    assert cfg.sync.port == 8765 and cfg.sync.spaces == ("local",)
