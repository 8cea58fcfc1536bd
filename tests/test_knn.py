"""kNN evaluation (pipeline/evaluate/knn.py): the vote on a hand-worked case, the bank streamed in blocks,
whitening on a hand-worked case and on a case it exists for, the bank split over 3 real gloo ranks
(one of them with no samples, one with fewer than k) against one process holding the whole bank, and the end-of-run kNN of a 4-rank pretraining spread over all
ranks."""
import json
import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from mlflow import MlflowClient

import ssl_foundry.pipeline.evaluate.knn as evaluate
from conftest import FMNIST_LIMIT, run_cli
from ssl_foundry.pipeline.evaluate.knn import knn_accuracy, knn_evaluate, knn_predict, nearest, vote, whitening
from ssl_foundry.pipeline.registry.export import load_timm_backbone

BANK_SHARES = (5, 0, 12)  # rows of the bank on each rank
DIM, QUERIES, CLASSES, K = 6, 9, 4, 8


def test_vote_weights_neighbours_by_exp_similarity_over_temperature():
    # One query, neighbours of classes 0, 1, 1 with similarities 0.9, 0.6, 0.5 and T = 0.1:
    # class 0 gets e^9 = 8103, class 1 gets e^6 + e^5 = 552: class 0. With T = 1: e^0.9 = 2.46
    # against e^0.6 + e^0.5 = 3.47: class 1.
    similarities, labels = torch.tensor([[0.9, 0.6, 0.5]]), torch.tensor([[0, 1, 1]])
    assert math.exp(9) > math.exp(6) + math.exp(5) and math.exp(0.9) < math.exp(0.6) + math.exp(0.5)
    assert vote(similarities, labels, num_classes=3, temperature=0.1).tolist() == [0]
    assert vote(similarities, labels, num_classes=3, temperature=1.0).tolist() == [1]


def test_nearest_streams_the_bank_in_blocks(monkeypatch):
    torch.manual_seed(0)
    queries = torch.nn.functional.normalize(torch.randn(5, DIM), dim=1)
    bank = torch.nn.functional.normalize(torch.randn(23, DIM), dim=1)
    expected_sim, expected_idx = (queries @ bank.T).topk(K, dim=1)
    monkeypatch.setattr(evaluate, "SIMILARITY_BLOCK", 5 * 4)  # blocks of 4 bank rows: 6 blocks, the last of 3
    similarities, index = nearest(queries, bank, K)
    assert torch.equal(index, expected_idx)
    # a block's matmul may round differently from the whole one's: a few ulps of a dot product of 6 terms
    torch.testing.assert_close(similarities, expected_sim, rtol=0, atol=8 * torch.finfo(torch.float32).eps)


def test_whitening_of_a_hand_worked_bank():
    # The corners of a 2 x 4 rectangle: mean (1, 2), covariance diag(1, 4), so W = diag(1, 1/2) up to
    # eps (relative to the largest eigenvalue 4): diag((1 + 4e)^-1/2, (4 + 4e)^-1/2).
    bank = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 4.0], [2.0, 4.0]])
    mean, matrix = whitening(bank, eps=1e-3)
    torch.testing.assert_close(mean, torch.tensor([1.0, 2.0]))
    torch.testing.assert_close(matrix, torch.diag(torch.tensor([1.004 ** -0.5, 4.004 ** -0.5])))
    whitened = (bank - mean) @ matrix
    torch.testing.assert_close(whitened.T @ whitened / 4, torch.diag(torch.tensor([1 / 1.004, 4 / 4.004])))


def test_whitening_lets_the_class_directions_decide_the_cosine():
    # Features like pooled ReLU ones: a large mean shared by all, 8 nuisance directions with a large
    # spread (sd 5) and the class (+-0.3) on 4 others with a small one (sd 0.1). The plain cosine's
    # neighbours are decided by the nuisance, near chance; once whitened, every direction counts
    # alike and the class directions separate the two classes.
    torch.manual_seed(0)

    def features(n):
        labels = torch.randint(0, 2, (n,))
        return torch.cat([torch.full((n, 1), 10.0), 5 * torch.randn(n, 8),
                          (0.6 * labels - 0.3)[:, None] + 0.1 * torch.randn(n, 4)], dim=1), labels

    (bank, bank_labels), (queries, query_labels) = features(2000), features(500)
    plain = knn_accuracy(bank, bank_labels, queries, query_labels, k=20)
    whitened = knn_accuracy(bank, bank_labels, queries, query_labels, k=20, whiten=True)
    assert plain < 0.7 and whitened > 0.95, (plain, whitened)


def _data():
    torch.manual_seed(1)
    bank = torch.randn(sum(BANK_SHARES), DIM)
    labels = torch.randint(0, CLASSES, (sum(BANK_SHARES),))
    return bank, labels, torch.randn(QUERIES, DIM)


def _sharded_rank(rank: int, port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=len(BANK_SHARES))
    torch.set_num_threads(1)
    bank, labels, queries = _data()
    start = sum(BANK_SHARES[:rank])
    part = slice(start, start + BANK_SHARES[rank])
    # chunk=4: several query chunks, each its own exchange of candidates
    out[rank] = (knn_predict(bank[part], labels[part], queries, CLASSES, K, temperature=0.1, chunk=4, sharded=True),
                 whitening(bank[part].reshape(-1, DIM), sharded=True))
    dist.destroy_process_group()


def test_bank_split_over_ranks_votes_and_whitens_like_the_whole_bank():
    bank, labels, queries = _data()
    expected = knn_predict(bank, labels, queries, CLASSES, K, temperature=0.1)
    expected_mean, expected_matrix = whitening(bank)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_sharded_rank, args=(port, out), nprocs=len(BANK_SHARES))
        predictions = dict(out)
    assert len(set(expected.tolist())) > 1  # the case is not trivially one class
    for rank in range(len(BANK_SHARES)):
        predicted, (mean, matrix) = predictions[rank]
        assert torch.equal(predicted, expected), rank
        torch.testing.assert_close(mean, expected_mean)
        torch.testing.assert_close(matrix, expected_matrix)


@pytest.mark.parametrize("k", [1, 30])  # 30 > the bank: every row votes
def test_k_is_capped_by_the_bank(k):
    bank, labels, queries = _data()
    predicted = knn_predict(bank, labels, queries, CLASSES, k, temperature=0.1)
    assert predicted.shape == (QUERIES,)
    if k == 1:
        nearest_row = (torch.nn.functional.normalize(queries, dim=1)
                       @ torch.nn.functional.normalize(bank, dim=1).T).argmax(dim=1)
        assert torch.equal(predicted, labels[nearest_row])


@pytest.mark.slow
def test_end_of_run_on_four_ranks_under_a_short_collective_timeout(tiny_config, tmp_path):
    """4 ranks whose collectives time out after 1 s, less than the end of the run takes here (the kNN
    over both eval splits, export, registration); when rank 0 went through it alone while the others
    waited in a barrier, as before, they timed out. Every rank extracts its share of the eval shards,
    and the kNN of the shares is the kNN of one process on the exported backbone. The online monitor
    (eval.knn_every) runs the same way mid-run, under the same timeout."""
    cfg = tiny_config(tmp_path / "run")
    done = run_cli(["pretrain", str(tmp_path / "run.yaml"), "launch.nproc_per_node=4", "launch.collective_timeout_s=1",
                    "eval.after_pretrain=true", "eval.knn_every=2", "mlflow.registered_model=knn-spread",
                    "data.readers=4", "train.threads=1"], tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    client = MlflowClient(tracking_uri=result["tracking_uri"])
    run = client.get_run(result["run_id"])
    per_rank = [run.data.metrics[f"knn_images_rank{r}"] for r in range(4)]
    assert per_rank == [2 * FMNIST_LIMIT / 4] * 4  # 2 of the 8 shards of each split per rank
    single = knn_evaluate(load_timm_backbone(result["backbone_dir"]), cfg, torch.device("cpu"))
    assert result["knn_top1"] == single == run.data.metrics["knn_top1"]
    monitor = client.get_metric_history(result["run_id"], "knn_monitor_top1")
    assert [m.step for m in monitor] == [2, 4] and all(0 <= m.value <= 1 for m in monitor)
    last_step = max(m.timestamp for m in client.get_metric_history(result["run_id"], "loss"))
    print(f"\nend of the 4-rank run: {(run.info.end_time - last_step) / 1000:.2f} s after its last step, of which "
          f"{result['timing']['knn_s']:.2f} s kNN on every rank (collective timeout 1 s)")
