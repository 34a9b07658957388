import numpy as np
import pytest

from qcompiler import metrics


def test_row_cosine_and_sqnr_closed_form():
    """Identical rows: cosine 1; orthogonal rows: 0; noise at 1/10 amplitude: SQNR 20 dB."""
    a = np.array([[1.0, 0.0], [0.0, 2.0]])
    np.testing.assert_allclose(metrics.row_cosine(a, a), [1.0, 1.0])
    np.testing.assert_allclose(metrics.row_cosine(a, a[::-1]), [0.0, 0.0])
    assert metrics.sqnr_db(np.ones(100), np.ones(100) * 1.1) == pytest.approx(20.0)


def test_query_document_pairs_split_first_sentence():
    """First sentence is the query, the rest the document; one-sentence paragraphs are skipped."""
    pairs = metrics.query_document_pairs(
        ["The first one here. Then the second part follows.", "Only one sentence here."]
    )
    assert pairs == [("The first one here.", "Then the second part follows.")]


def test_retrieval_ranks():
    """Query 0 finds its document first; query 1 ranks its own second: R@1 0.5, MRR 0.75."""
    queries = np.array([[1.0, 0.0], [1.0, 0.1]])
    documents = np.array([[1.0, 0.0], [0.0, 1.0]])
    result = metrics.retrieval(queries, documents)
    assert result.recall_at_1 == 0.5 and result.mrr == pytest.approx(0.75) and result.queries == 2


def test_next_token_nll_closed_form():
    """Uniform logits over V tokens: NLL per token is log V; a certain prediction costs ~0."""
    vocab = 8
    ids = np.array([[1, 2, 3, 4]])
    nll, count = metrics.next_token_nll(np.zeros((1, 4, vocab)), ids)
    assert count == 3 and nll == pytest.approx(3 * np.log(vocab))
    certain = np.full((1, 4, vocab), -1e4)
    certain[0, np.arange(3), ids[0, 1:]] = 0.0
    assert metrics.next_token_nll(certain, ids)[0] == pytest.approx(0.0, abs=1e-6)
