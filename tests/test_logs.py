"""Library lines are logging records: stdout lines by default, the application's handlers
when it has some."""

import json
import logging

from dist_diffusion.logs import get_logger, route_to_application


def test_records_are_lines_on_stdout_by_default(capsys):
    get_logger("train").info("step 3/10 loss 0.5")
    get_logger("train").debug("not at INFO")
    assert capsys.readouterr().out == "[train] step 3/10 loss 0.5\n"


def test_an_application_handler_takes_the_records_instead(capsys):
    seen = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append((record.name, record.levelname, record.getMessage()))

    package, root, handler = logging.getLogger("dist_diffusion"), logging.getLogger(), Keep()
    saved = list(package.handlers)
    root.addHandler(handler)
    try:
        route_to_application()
        get_logger("eval").warning("reference statistics computed")
    finally:
        root.removeHandler(handler)
        package.handlers, package.propagate = saved, False
    assert seen == [("dist_diffusion.eval", "WARNING", "reference statistics computed")]
    assert capsys.readouterr().out == ""


def test_the_level_is_the_applications_to_set(capsys):
    package = logging.getLogger("dist_diffusion")
    saved = package.level
    package.setLevel(logging.WARNING)
    try:
        get_logger("train").info("hidden")
        get_logger("train").warning("shown")
    finally:
        package.setLevel(saved)
    assert capsys.readouterr().out == "[train] shown\n"


def test_the_sample_key_record_is_written_at_log_steps_checkpoints_and_the_end(tmp_path):
    """Not a write and flush per step per rank (a cost on NFS or Lustre): buffered, then
    written at log_every, at a checkpoint (flush_samples) and at close."""
    from types import SimpleNamespace

    import torch

    from dist_diffusion.config import load_config
    from dist_diffusion.train.log import TrainLogger

    train = load_config("configs/tiny.yaml", ["train.log_every=5", "train.max_steps=12"]).train
    logger = TrainLogger(train, SimpleNamespace(rank=3, world_size=1, is_main=False), tmp_path)
    record = tmp_path / "samples_rank003.jsonl"

    def steps(first, last):
        for step in range(first, last + 1):
            logger.step(step, {"keys": [f"k{step}"], "corrupt_samples": 0, "data_wait_s": 0.0,
                               "per_sample": torch.ones(1), "noise_level": torch.full((1,), 0.5),
                               "grad_norm": 1.0, "lr": 1e-3})

    def written():
        return [json.loads(line)["step"] for line in record.read_text().splitlines()]

    steps(1, 4)
    assert written() == []
    steps(5, 5)
    assert written() == [1, 2, 3, 4, 5]
    steps(6, 7)
    logger.flush_samples()  # what a checkpoint does before it is written
    assert written() == list(range(1, 8))
    steps(8, 9)
    logger.close()
    assert written() == list(range(1, 10))
