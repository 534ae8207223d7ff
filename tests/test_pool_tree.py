"""The phrase pool, the draft tree and Jacobi window layouts, and phrase learning, on hand-made cases."""

import pytest
import torch
from tiny_models import tiny_model

from ouroboros import OuroborosConfig, PhrasePool
from ouroboros.acceptance import greedy_verify
from ouroboros.runner import ModelRunner
from ouroboros.tree import ROOT, DraftTree
from ouroboros.window import JacobiWindow


def test_pool_insert_refresh_evict_lookup():
    pool = PhrasePool(level=3, capacity=2)
    pool.insert(1, (2, 3))
    pool.insert(1, (4, 5))
    assert pool.lookup(1, 5) == [(4, 5), (2, 3)]  # newest first
    pool.insert(1, (2, 3))  # refresh: moves to the newest end
    assert pool.lookup(1, 5) == [(2, 3), (4, 5)]
    pool.insert(1, (6, 7))  # full: the oldest, (4, 5), goes
    assert pool.lookup(1, 5) == [(6, 7), (2, 3)]
    assert pool.lookup(1, 1) == [(6, 7)]
    assert pool.lookup(9, 3) == [] and pool.lookup(1, 0) == []
    assert len(pool) == 2 and (1, (2, 3)) in pool and (1, (4, 5)) not in pool
    pool.replace(1, (2, 3), (8, 9))
    assert pool.lookup(1, 5) == [(8, 9), (6, 7)]
    with pytest.raises(ValueError, match="level-1 = 2 tokens"):
        pool.insert(1, (1, 2, 3))


def test_pool_context_ngrams_and_round_trip(tmp_path):
    pool = PhrasePool(level=3, capacity=4)
    pool.insert_ngrams([5, 6, 7, 5, 6, 8])
    assert pool.lookup(5, 4) == [(6, 8), (6, 7)]
    assert pool.lookup(6, 4) == [(7, 5)]
    path = tmp_path / "pool.json"
    pool.save(path, metadata={"tokenizer": "abc"})
    loaded, meta = PhrasePool.load(path)
    assert meta == {"tokenizer": "abc"} and loaded.state_dict() == pool.state_dict()
    path.write_text("{not json")
    with pytest.raises(ValueError, match="pool.json"):
        PhrasePool.load(path)


@pytest.mark.parametrize("kwargs, field", [
    (dict(gamma=0), "gamma"), (dict(window=0), "window"), (dict(level=1), "level"),
    (dict(pool_size=0), "pool_size"), (dict(branches=-1), "branches"), (dict(step_phrases=9), "step_phrases"),
    (dict(gamma=2.5), "gamma"), (dict(lengthen="yes"), "lengthen"), (dict(branches=True), "branches"),
])
def test_config_values_are_checked(kwargs, field):
    with pytest.raises((ValueError, TypeError), match=field):
        OuroborosConfig(**kwargs)


def test_tree_merges_shared_prefixes_and_masks_ancestors():
    tree = DraftTree()
    trunk = tree.add_chain([10, 11, 12])
    a = tree.add_chain([20, 21], parent=trunk[-1])
    b = tree.add_chain([20, 22], parent=trunk[-1])  # shares node 20 with a
    assert a[0] == b[0] and tree.size == 6
    assert tree.child(ROOT, 10) == trunk[0] and tree.child(trunk[-1], 20) == a[0]
    tokens, positions, mask = tree.layout()
    assert positions.tolist() == [1, 2, 3, 4, 5, 5]
    expected = torch.zeros(6, 6, dtype=torch.bool)
    for node, ancestors in {0: [0], 1: [0, 1], 2: [0, 1, 2], 3: [0, 1, 2, 3], 4: [0, 1, 2, 3, 4],
                            5: [0, 1, 2, 3, 5]}.items():
        expected[node, ancestors] = True
    assert torch.equal(mask, expected)
    capped = DraftTree(max_depth=2)
    assert len(capped.add_chain([1, 2, 3, 4])) == 2


def test_window_layout_is_a_set_of_diagonal_trajectories():
    window = JacobiWindow(width=3, level=4, seed=[1, 2, 3, 4])
    assert window.levels == [[3, 4]]
    window.update(root=9, root_output=7, outputs=[5, 6])  # fills level 1 from level-0 outputs
    assert window.levels == [[3, 4], [7, 5, 6]]
    window.update(root=9, root_output=0, outputs=[0, 0, 1, 2, 3])
    tokens, positions, mask = window.nodes()
    assert tokens == [3, 4, 7, 5, 6, 1, 2, 3]
    assert positions.tolist() == [1, 2, 1, 2, 3, 2, 3, 4]  # level + column
    # level-2 column 1 (node 6) sees level-0 column 1 and its own column on levels 1..2
    assert mask[6].nonzero().flatten().tolist() == [0, 3, 6]
    # level-1 column 0 (node 2) sees only itself (column 0 of level 0 is the root)
    assert mask[2].nonzero().flatten().tolist() == [2]
    ngrams = window.update(root=9, root_output=0, outputs=[0] * 5 + [7, 8, 9])
    assert ngrams == [(9, (7, 1, 7)), (3, (5, 2, 8)), (4, (6, 3, 9))]
    assert window.levels == [[5, 6], [1, 2, 3], [7, 8, 9]]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tree_forward_equals_each_path_run_alone(arch):
    """Trunk + branches (target side) and window + phrases (draft side): the logits of every node
    equal those of a plain causal forward over the tokens it sees, at the same positions."""
    model = tiny_model(arch, seed=2, vocab=50)
    prefix = [3, 1, 4, 1, 5, 9, 2, 6]
    trunk_tree = DraftTree()
    trunk = trunk_tree.add_chain([7, 8, 9])
    trunk_tree.add_chain([10, 11], parent=trunk[-1])
    trunk_tree.add_chain([12, 13], parent=trunk[-1])
    trunk_tree.add_chain([7, 14])  # a second branch from the root, sharing node 7
    window_tree = DraftTree()
    window_tree.add_chain([20, 21, 22])
    window = JacobiWindow(width=3, level=4, seed=[30, 31])
    window.levels = [[30, 31], [32, 33, 34], [35, 36, 37]]
    window_tree.set_window(*window.nodes())
    for tree in (trunk_tree, window_tree):
        runner = ModelRunner(model)
        with torch.no_grad():
            runner.forward(prefix[:5], DraftTree())
            runner.keep([])
            logits = runner.forward(prefix[5:], tree)
        tokens, positions, mask = tree.layout()
        for node in range(len(tokens)):
            seen = mask[node].nonzero().flatten().tolist()
            ids = prefix + [tokens[i] for i in seen]
            pos = list(range(len(prefix))) + [len(prefix) - 1 + int(positions[i]) for i in seen]
            assert pos == list(range(len(ids))), "a node must see a gap-free sequence"
            with torch.no_grad():
                alone = model(torch.tensor([ids])).logits[0, -1]
            torch.testing.assert_close(logits[node + 1], alone, atol=1e-5, rtol=1e-5)


def test_keep_moves_an_accepted_branch_into_place():
    model = tiny_model("llama", seed=4, vocab=40)
    prefix = [1, 2, 3, 4]
    tree = DraftTree()
    trunk = tree.add_chain([5, 6])
    tree.add_chain([7], parent=trunk[-1])
    branch = tree.add_chain([8, 9], parent=trunk[-1])
    runner = ModelRunner(model)
    with torch.no_grad():
        runner.forward(prefix, tree)
        runner.keep(trunk + branch)
        assert runner.tokens == prefix + [5, 6, 8, 9]
        after = runner.forward([10], DraftTree())[0]
        plain = model(torch.tensor([prefix + [5, 6, 8, 9, 10]])).logits[0, -1]
    torch.testing.assert_close(after, plain, atol=1e-5, rtol=1e-5)
    assert runner.rewind(prefix + [5, 6, 0]) == [0] and runner.tokens == prefix + [5, 6]


def test_greedy_walk_accepts_the_longest_matching_path():
    tree = DraftTree()
    trunk = tree.add_chain([5, 6, 7])
    tree.add_chain([8, 9], parent=trunk[-1])
    vocab = 12
    choices = {0: 5, 1: 6, 2: 7, 3: 8, 4: 9, 5: 3}  # row -> target argmax
    logits = torch.zeros(1 + tree.size, vocab)
    for row, token in choices.items():
        logits[row, token] = 1.0
    result = greedy_verify(tree, logits)
    assert result.emitted == [5, 6, 7, 8, 9, 3] and result.path == [0, 1, 2, 3, 4]
    logits[2] = 0
    logits[2, 11] = 1.0  # the target disagrees after 6: correction 11
    result = greedy_verify(tree, logits)
    assert result.emitted == [5, 6, 11] and result.path == [0, 1]
