"""Beam search: width 1 is greedy, and wider beams equal a from-scratch reference search."""

import torch

from edgekv import LLM, SamplingParams


def prompt(n, seed=0):
    return torch.randint(3, 320, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def make(llama_dir, **kw):
    return LLM(llama_dir, kv_format="fp32", kv_memory="8MiB", dtype=torch.float32, **kw)


def reference_beam_search(llm, p, width, max_tokens, length_penalty=1.0):
    """The same search, scoring every hypothesis from scratch (teacher-forced)."""
    live, done = [(0.0, [])], []
    while live:
        cands = []
        for cum, ids in live:
            lp = torch.log_softmax(llm.score(p + ids)[-1].float(), -1)
            top = torch.topk(lp, 2 * width)
            pairs = zip(top.values.tolist(), top.indices.tolist(), strict=True)
            cands += [(cum + v, ids + [t]) for v, t in pairs]
        cands.sort(key=lambda c: -c[0])
        live = []
        for cum, ids in cands[:width]:
            if ids[-1] in llm.engine.eos_ids:
                done.append((cum, ids))
            elif len(ids) >= max_tokens:
                done.append((cum, ids))
            else:
                live.append((cum, ids))
    done.sort(key=lambda d: -d[0] / len(d[1]) ** length_penalty)
    return [ids for _, ids in done[:width]]


def test_beam_width_one_is_greedy(llama_dir):
    llm = make(llama_dir)
    p = prompt(21)
    greedy = llm.generate([p], SamplingParams(max_tokens=10, temperature=0.0))[0]
    beam = llm.generate([p], SamplingParams(max_tokens=10, beam_width=1))[0]
    assert beam.token_ids == greedy.token_ids


def test_beams_equal_the_reference_search_and_share_blocks(llama_dir):
    llm = make(llama_dir)
    p = prompt(37, seed=1)
    params = SamplingParams(max_tokens=6, beam_width=3)
    eng = llm.engine
    (seq,) = llm._sequences([p], params)
    eng.add(seq)
    peak_shared = 0
    while not seq.beam.finished:
        eng.step()
        rc = eng.manager.pool.ref_counts
        peak_shared = max(peak_shared, sum(r > 1 for r in rc))
    assert peak_shared >= 2  # the beams' common prompt blocks are held once
    out = [ids for _, ids, _, _ in seq.beam.results()]
    assert out == reference_beam_search(llm, p, 3, 6)
    assert eng.kv_stats()["blocks_used"] == 0
    eng.manager.check_integrity()


def test_generate_returns_beams_best_first(llama_dir):
    llm = make(llama_dir)
    ps = [prompt(9, seed=2), prompt(30, seed=3)]
    outs = llm.generate(ps, SamplingParams(max_tokens=5, beam_width=4))
    for o in outs:
        assert len(o.outputs) == 4 and o.token_ids == o.outputs[0].token_ids
        scores = [c.cumulative_logprob / len(c.token_ids) for c in o.outputs]
        assert scores == sorted(scores, reverse=True)
