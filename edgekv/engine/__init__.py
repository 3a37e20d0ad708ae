"""The engine: requests in, tokens out.

    engine.py        Engine.step(): schedule, run, sample, postprocess
    scheduler.py     continuous batching, chunked prefill, admission, preemption
    model_runner.py  batch -> tensors -> model -> logits (the step's plan, made once)
    sequence.py      one request's tokens and state;  requests.py  what a request may be
    outputs.py       what LLM.generate returns;  stats.py  kv_stats()
    sampling.py      SamplingParams and the sampler;  beam_search.py  beams as forks
    detokenizer.py   incremental text;  stop_strings.py  stop strings across pieces
    scoring.py       LLM.score: teacher-forced logits read back through the cache
    guard.py         one driver at a time;  rollback.py  a failed step undone
    integrity.py     check_integrity(): the invariants every fault test asserts
"""
