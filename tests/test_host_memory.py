"""train.return_freed_memory (host_memory.py): freed tensors go back to the OS, checked on the process's own RSS."""

import subprocess
import sys
import textwrap

import pytest

from conftest import tiny_recipe

PROBE = textwrap.dedent("""
    import sys, torch
    from qlora_kit.lowmem import host_memory
    from qlora_kit.measure.breakdown import rss_kib
    if sys.argv[1] == "on":
        assert host_memory.return_freed_memory()
    torch.empty(8 << 20, dtype=torch.uint8).fill_(1)  # a free of 8 MiB: glibc's mmap threshold rises to 8 MiB
    blocks, pins = [], []
    for _ in range(20):  # 60 MiB in 3 MiB tensors, each followed by a small one that stays: holes, not a free top
        blocks.append(torch.empty(3 << 20, dtype=torch.uint8).fill_(1))
        pins.append(torch.empty(256 << 10, dtype=torch.uint8).fill_(1))
    held = rss_kib()
    del blocks
    print((held - rss_kib()) // 1024)  # MiB given back to the OS by freeing the 3 MiB tensors
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_freed_tensors_return_to_the_os_only_when_asked():
    returned = {mode: int(subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True,
                                     check=True).stdout) for mode in ("off", "on")}
    assert returned["off"] <= 5, returned  # glibc's default: the 60 MiB stay in the process, free for reuse
    assert returned["on"] >= 55, returned


def test_the_recipe_switch_reaches_glibc(tiny_model, tiny_data, monkeypatch):
    from qlora_kit.lowmem import host_memory
    from qlora_kit.train.prepare import prepare

    calls = []
    monkeypatch.setattr(host_memory, "return_freed_memory", lambda: calls.append(1) or True)
    prepare(tiny_recipe(tiny_model, tiny_data))
    assert calls == []
    prepare(tiny_recipe(tiny_model, tiny_data, train={"return_freed_memory": True}))
    assert calls == [1]
