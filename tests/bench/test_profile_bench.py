"""bench profile: py-spy stacks sorted into the request's stages."""

from __future__ import annotations

import pytest

from bench.profile import (
    IDLE_LOOP,
    IDLE_OTHER,
    IDLE_WORKERS,
    WORKERS,
    ProfileBenchError,
    ProfileConfig,
    shares,
    stage_of,
    tally,
)

LOOP = "thread (1): MainThread;main (runtime/serve.py:123);Runner.run (asyncio/runners.py:118)"
WORKER = "thread (2): coded-worker_0;Thread.run (threading.py:982);_worker (concurrent/futures/thread.py:83)"


@pytest.mark.parametrize(("stack", "stage"), [
    (LOOP, IDLE_LOOP),
    (WORKER.replace(":83)", ":81)"), IDLE_WORKERS),
    (WORKER + ";OrtRunner.run (runtime/engines.py:66);Session.run (x.py:1)", WORKERS),
    (WORKER + ";Frontend.encode.<locals>.<lambda> (runtime/frontend.py:60);OrtRunner.run (e.py:1)",
     "encoder"),
    (LOOP + ";CodedMode.execute (runtime/modes/coded.py:62);Frontend.encode (runtime/frontend.py:54)"
            ";OrtRunner.run (runtime/engines.py:66)", "encoder"),
    (LOOP + ";HttpFrontend._infer (runtime/http_server.py:220);encode_response (runtime/protocol.py:290)",
     "response"),
    (LOOP + ";HttpFrontend._infer (runtime/http_server.py:220);parse_infer_request (runtime/protocol.py:1)",
     "tensor decode"),
    (LOOP + ";Arrivals.until (runtime/modes/base.py:99);OnlineDecoder.add (kernels/coding.py:388)", "decode"),
    (LOOP + ";RequestHandler.data_received (aiohttp/web_protocol.py:446)", "HTTP"),
    ("thread (3): Thread-1 (_poll_wrapper);Thread._bootstrap (threading.py:1002);Thread.run "
     "(threading.py:982)", IDLE_OTHER),
])
def test_each_stack_lands_in_one_stage(stack: str, stage: str) -> None:
    assert stage_of(stack) == stage


def test_tally_and_shares_count_busy_samples_only() -> None:
    raw = "\n".join([f"{LOOP} 5",
                     f"{WORKER};OrtRunner.run (runtime/engines.py:66) 30",
                     f"{LOOP};HttpFrontend._errors (runtime/http_server.py:131) 10", ""])
    counts = tally(raw)
    assert counts == {IDLE_LOOP: 5, WORKERS: 30, "HTTP": 10}
    got = shares(counts)
    assert got[WORKERS] == pytest.approx(30 / 40) and got["HTTP"] == pytest.approx(10 / 40)
    assert IDLE_LOOP not in got


def test_config_is_validated(tmp_path) -> None:
    with pytest.raises(ProfileBenchError, match="not a bundle"):
        ProfileConfig(bundle=str(tmp_path))
