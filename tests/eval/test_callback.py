"""SampleEvalCallback logs ``eval_<task>_accuracy`` through the trainer during a real (tiny) training run."""

from __future__ import annotations

from pathlib import Path

import pytest

from axolotl_soka.eval.callback import SampleEvalCallback


def test_callback_logs_accuracy_through_the_trainer(
    tiny_model_dir: Path, gsm8k_test: list[dict], tmp_path: Path
) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = tokenizer("Question: 1 + 1?\nAnswer: 2\n#### 2")["input_ids"]
    train = [{"input_ids": torch.tensor(ids), "labels": torch.tensor(ids)} for _ in range(4)]
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=2,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        use_cpu=True,
        disable_tqdm=True,
    )
    callback = SampleEvalCallback("gsm8k", gsm8k_test, tokenizer, every=1, limit=2, max_new_tokens=4)
    trainer = Trainer(model=model, args=args, train_dataset=train, callbacks=[callback])
    callback.bind(trainer)
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "eval_gsm8k_accuracy" in entry]
    assert [entry["step"] for entry in logged] == [1, 2]  # every step; not again at train end
    assert all(0.0 <= entry["eval_gsm8k_accuracy"] <= 1.0 for entry in logged)
    assert model.training  # the callback restores training mode


def test_unbound_callback_appends_to_log_history(tiny_model_dir: Path, gsm8k_test: list[dict]) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerControl, TrainerState

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    state = TrainerState()
    state.global_step = 5
    callback = SampleEvalCallback("gsm8k", gsm8k_test, tokenizer, limit=1, max_new_tokens=2)
    callback.on_train_end(None, state, TrainerControl(), model=model)
    assert state.log_history[-1]["step"] == 5
    assert "eval_gsm8k_accuracy" in state.log_history[-1]


def test_bad_arguments(tiny_model_dir: Path) -> None:
    with pytest.raises(ValueError, match="allowed"):
        SampleEvalCallback("nope", [{}], None)
    with pytest.raises(ValueError, match="records"):
        SampleEvalCallback("gsm8k", [], None)
