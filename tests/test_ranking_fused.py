"""`ranking.fuse_and_collapse` is `collapse_and_cap(fuse(...))`: the same rows, floats and kinds.

The fast form skips building a `Fused` for every row; these tests hold it to the
reference over random channels with shared keys, several node kinds per object,
tied ranks, every mode, with and without collapse and a diversity cap.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from slipstream.index import ranking

KEYS = st.tuples(st.sampled_from(["doc", "note"]), st.sampled_from([str(i) for i in range(12)]),
                 st.sampled_from(["leaf", "summary", "chunk"]))


def _channel(keys: list, scores: list) -> list:
    seen = dict.fromkeys(keys)
    return sorted(zip(seen, scores), key=lambda kv: (-kv[1], kv[0]))


@settings(max_examples=400, deadline=None)
@given(lex_keys=st.lists(KEYS, max_size=40), sem_keys=st.lists(KEYS, max_size=40),
       scores=st.lists(st.floats(0.01, 3.0), min_size=40, max_size=40),
       mode=st.sampled_from(sorted(ranking.MODES)), depth=st.integers(1, 40),
       collapse=st.booleans(), cap=st.sampled_from([None, 1, 2]),
       group=st.sampled_from(["object_type", "node_kind"]), k=st.integers(1, 15))
def test_fuse_and_collapse_matches_the_reference(lex_keys, sem_keys, scores, mode, depth, collapse,
                                                 cap, group, k) -> None:
    lexical, semantic = _channel(lex_keys, scores), _channel(sem_keys, scores[::-1])
    group_of = ranking.group_lookup({}, group) if cap is not None else None
    want = ranking.collapse_and_cap(ranking.fuse(lexical, semantic, mode=mode, depth=depth),
                                    collapse=collapse, group_of=group_of, cap=cap, k=k)
    got = ranking.fuse_and_collapse(lexical, semantic, mode=mode, depth=depth, collapse=collapse,
                                    group_of=group_of, cap=cap, k=k)
    assert [(f.key, f.score, f.lexical_rank, f.lexical_score, f.semantic_rank, f.semantic_score,
             f.match_type, kinds) for f, kinds in got] == \
           [(f.key, f.score, f.lexical_rank, f.lexical_score, f.semantic_rank, f.semantic_score,
             f.match_type, kinds) for f, kinds in want]
