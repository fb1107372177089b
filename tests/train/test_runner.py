"""The one training runner (spatia.train.run_trainer): precision, seeding, history, checkpoints and exact resume."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch

from spatia.train import RandomStateCallback, default_precision, run_trainer
from spatia.train._runner import check_checkpoint


class _Plan(pl.LightningModule):
    """A small regression with dropout: its result depends on the weights' seed, the batch order and the RNG."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.2), torch.nn.Linear(8, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss, on_epoch=True, on_step=False)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def _data():
    g = torch.Generator().manual_seed(123)
    x = torch.randn(64, 4, generator=g)
    return torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True))


def _fit(max_epochs: int, seed: int = 0, **kw):
    torch.manual_seed(seed)
    plan = _Plan()
    generator = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(_data(), batch_size=8, shuffle=True, generator=generator)
    trainer, history = run_trainer(plan, loader, name="test", max_epochs=max_epochs, accelerator="cpu", seed=seed,
                                   callbacks=[RandomStateCallback(generator)], deterministic=True, **kw)
    return plan, trainer, history


def _weights(plan) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in plan.parameters()])


def test_default_precision():
    assert default_precision(None, "cpu") == "32-true"
    assert default_precision("16-mixed", "cpu") == "16-mixed"  # as given
    expected = "bf16-mixed" if torch.cuda.is_available() else "32-true"
    assert default_precision(None, "auto") == expected
    _, trainer, _ = _fit(1)
    assert trainer.precision == "32-true"


def test_same_seed_same_result_and_history():
    a, trainer, history = _fit(3)
    b, _, _ = _fit(3)
    c, _, _ = _fit(3, seed=1)
    assert torch.equal(_weights(a), _weights(b)) and not torch.equal(_weights(a), _weights(c))
    assert [row["epoch"] for row in history.history] == [0, 1, 2] and "train_loss" in history.history[0]
    assert trainer.current_epoch == 3 and not trainer.checkpoint_callbacks  # no checkpoints unless asked


def test_resume_from_checkpoint_is_exact(tmp_path):
    whole, _, _ = _fit(4)
    _fit(2, checkpoint_dir=tmp_path / "ck")
    last = tmp_path / "ck" / "last.ckpt"
    assert last.is_file()
    resumed, trainer, history = _fit(4, checkpoint_dir=tmp_path / "ck2", ckpt_path=last)
    assert trainer.current_epoch == 4
    torch.testing.assert_close(_weights(resumed), _weights(whole), rtol=0, atol=0)
    assert [row["epoch"] for row in history.history] == [0, 1, 2, 3]  # the epochs before the resume are kept


def test_checkpoints_are_checked_before_use(tmp_path):
    with pytest.raises(FileNotFoundError, match="No checkpoint"):
        check_checkpoint(tmp_path / "missing.ckpt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match="not a Lightning checkpoint"):
        check_checkpoint(tmp_path / "other.ckpt")
    (tmp_path / "text.ckpt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="not a readable checkpoint|refusing to unpickle"):
        check_checkpoint(tmp_path / "text.ckpt")


def test_torch_threads_are_kept():
    n = torch.get_num_threads()
    _fit(1)
    assert torch.get_num_threads() == n
