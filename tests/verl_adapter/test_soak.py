"""The rollout server survives many rollout + update cycles with faults injected (examples/soak.py):
every request answered, nothing left behind, counters consistent, memory flat."""

from __future__ import annotations


def test_soak_of_rollouts_updates_aborts_and_faults_keeps_every_invariant(load_example):
    soak = load_example("soak.py")
    engine = soak.small_engine()
    report = soak.soak(engine, seconds=15.0, max_cycles=60, seed=3)
    assert report.problems == []
    assert report.cycles >= 12  # enough to go through every kind of fault at least once
    assert report.requests == report.completed + report.aborted + report.rejected_requests
    assert report.completed > 0 and report.aborted > 0 and report.rejected_requests > 0
    assert report.rejected_updates >= 2 and report.interrupted_updates >= 1 and report.drafter_faults == 1
    assert report.weight_updates == engine.weights_version  # every good update applied, no bad one
    assert 0 < report.speculated_steps < report.decode_steps and report.accepted_tokens > 0
    assert report.rss_mib_end - report.rss_mib_first_cycle < 64, report
    assert abs(report.tensor_mib_end - report.tensor_mib_first_cycle) < 1, report  # no tensor kept alive
    # KV is sized per rollout for at most 16 rows x (max_model_len + longest draft + 1) and freed at each update.
    args, max_len = engine.target.args, engine.engine_config.max_model_len + 8 + 1
    bound = 2 * args.num_layers * 16 * args.num_kv_heads * max_len * args.head_dim * 4 / 2**20
    assert 0 < report.kv_mib_max <= bound, (report.kv_mib_max, bound)
