"""bench.netns_cluster's node-count probe output, parsed without a cluster."""

from __future__ import annotations

from bench.netns_cluster import ALIVE_MARK, alive_count


def test_the_marked_count_is_read_around_ray_log_lines() -> None:
    # the driver may echo a crashed raylet's stack trace after the count (seen in a clean run)
    out = "\n".join(["[2026-12-03 raylet] *** SIGSEGV ***", f"{ALIVE_MARK} 3",
                     "    /x/ray/raylet(+0x263cb7) [0x557688b38cb7]", ""])
    assert alive_count(out) == 3


def test_no_marked_count_is_no_node_up_yet() -> None:
    assert alive_count("    /x/ray/raylet(+0x263cb7) [0x557688b38cb7]\n") == 0
    assert alive_count("") == 0
