"""Images through the vision tower once per pair give the log-probabilities of encoding them for every sequence."""

from __future__ import annotations

import pytest

from dpo_testing import vistune_trainer, write_jsonl
from test_dpo_trl_parity import BATCH, perturb_lora

torch = pytest.importorskip("torch")


@pytest.mark.parametrize("kind", ["tiny_llava", "tiny_qwen2_vl"])
def test_shared_features_equal_the_models_own_image_encoding(kind, request, shape_pairs, tmp_path, monkeypatch):
    from vistune_dpo import trainer as trainer_module

    directory, records = shape_pairs
    trainer, _ = vistune_trainer(request.getfixturevalue(kind), write_jsonl(directory / "trl.jsonl", records),
                                 tmp_path / "out", "dpo", template=None)  # fmt: skip
    perturb_lora(trainer.model)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(BATCH)])
    assert trainer_module.shares_image_features(trainer.model)
    with torch.no_grad():
        shared = trainer._paired_logps(trainer.model, batch)
        # the model encodes the pixels itself, once per sequence (each pair's images given twice)
        monkeypatch.setattr(trainer_module, "shares_image_features", lambda model: False)
        repeated = trainer._paired_logps(trainer.model, batch)
    torch.testing.assert_close(shared.sums, repeated.sums, rtol=1e-5, atol=1e-4)
    assert torch.equal(shared.counts, repeated.counts) and shared.counts.min() > 0
