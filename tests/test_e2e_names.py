"""Names through the real CLI: spellings kept byte for byte, either form accepted."""

from __future__ import annotations

import json
import os
import unicodedata
from pathlib import Path

from tests.e2e import Device, free_port, invite, snapshot, summary_number

NFC = unicodedata.normalize("NFC", "café-résumé.txt")
NFD = unicodedata.normalize("NFD", NFC)


def test_nfd_name_reaches_a_peer_byte_identical_and_history_takes_either_form(
    tmp_path: Path,
) -> None:
    a, b = Device(tmp_path, "a"), Device(tmp_path, "b")
    (a.root / "mac").mkdir(parents=True)
    (a.root / "mac" / NFD).write_text("written on macOS\n")
    (a.root / "both").mkdir()
    (a.root / "both" / NFC).write_text("composed\n")
    (a.root / "both" / NFD).write_text("decomposed\n")
    a.run("init", str(a.root))
    port = free_port()
    token = invite(a, f"127.0.0.1:{port}")
    with a.serving(port) as address:
        joined = b.run("join", token, str(b.root))
        assert "errors 0" in joined.stdout, joined.stdout + joined.stderr
        assert os.listdir(os.fsencode(b.root / "mac")) == [os.fsencode(NFD)]
        assert sorted(os.listdir(os.fsencode(b.root / "both"))) == sorted(
            [os.fsencode(NFC), os.fsencode(NFD)]
        )
        assert snapshot(b.root) == snapshot(a.root)
        again = b.sync(address)  # no loop: nothing more to move
        assert summary_number(again, "events received") == 0
        assert summary_number(again, "files written") == 0
    for spelling in (NFC, NFD):
        out = b.run("history", str(b.root / "mac" / spelling), "--json", "--dir", str(b.root))
        assert len(json.loads(out.stdout)) == 1
        out = b.run("history", str(b.root / "both" / spelling), "--json", "--dir", str(b.root))
        assert json.loads(out.stdout)[0]["size"] == len(
            "composed\n" if spelling == NFC else "decomposed\n"
        )
