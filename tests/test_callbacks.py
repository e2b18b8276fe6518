"""The checkpoint callback keeps the last step of a run that stops between scheduled saves."""

import yaml

from medidiff.checkpoint import read_checkpoint
from medidiff.cli import main
from tests.conftest import REPO


def test_last_checkpoint_holds_the_final_step_not_the_last_scheduled_one(tmp_path):
    callbacks = tmp_path / "callbacks.yaml"
    callbacks.write_text(yaml.safe_dump({"trainer": {"callbacks": [
        {"class_path": "medidiff.callbacks.Checkpoint", "init_args": {"save_last": True, "every_n_train_steps": 5}}]}}))
    code = main(["fit", "--config", str(REPO / "configs/segmentation/sample_mni_2d.yaml"), "--config", str(callbacks),
                 "--data.patch_size", "[32, 32]", "--trainer.max_steps", "7", "--trainer.limit_val_batches", "0",
                 "--trainer.max_time", "null", "--trainer.default_root_dir", str(tmp_path),
                 "--trainer.enable_progress_bar", "false", "--model.init_args.net.init_args.channels", "[8, 16]"])
    assert code == 0
    saved = {p.name: read_checkpoint(p)["global_step"] for p in tmp_path.rglob("*.ckpt")}
    assert saved.pop("last.ckpt") == 7, saved
    assert list(saved.values()) == [5], saved  # the scheduled save, kept as the one top-k file


def test_the_step_count_chosen_on_validation_is_the_best_and_the_fewest_on_ties():
    from types import SimpleNamespace

    from medidiff.callbacks import choose_steps

    hparams = SimpleNamespace(sampler="dpmpp_2m", grid="exponential")
    assert choose_steps({1: 0.90, 2: 0.95, 5: 0.95, 10: 0.93}, ("dice", "max"), hparams, 7)["steps"] == 2
    assert choose_steps({10: 0.30, 5: 0.30, 1: 0.50}, ("loss", "min"), hparams, 7)["steps"] == 5
    chosen = choose_steps({1: 0.5, 2: 0.4}, ("loss", "min"), hparams, 7)
    assert chosen["steps"] == 2 and chosen["chosen_by"] == "validation" and chosen["global_step"] == 7
