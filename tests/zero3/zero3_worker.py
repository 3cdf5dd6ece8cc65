"""One process of a 2-process DeepSpeed ZeRO-3 run on the CPU (gloo), launched by ``test_zero3_cpu.py``.

Loads a saved tiny Llama under ZeRO-3 (partitioned weights), initialises SoKA through ``get_peft_model`` (the
code path the Axolotl plugin uses), records the decisions, factors and residual weights, trains a few steps
through ``deepspeed.initialize``, saves the adapter (gathering only SoKA parameters) and the logits.
Usage: ``torchrun --nproc_per_node 2 zero3_worker.py MODEL_DIR OUT_DIR``.
"""

from __future__ import annotations

import json
import os
import sys
import time

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import deepspeed  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from peft import PeftModel, get_peft_model  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402
from transformers.integrations import HfDeepSpeedConfig  # noqa: E402

import axolotl_soka  # noqa: E402
from axolotl_soka import SokaConfig, SokaLayer  # noqa: E402
from axolotl_soka.tuner.distributed import gathered  # noqa: E402
from axolotl_soka.tuner.layer import SokaLinear  # noqa: E402

DS_CONFIG = {
    "train_micro_batch_size_per_gpu": 1,
    "gradient_accumulation_steps": 1,
    # sequential gathers: on gloo (CPU), DeepSpeed's coalesced gather of several parameters does not wait for
    # all of its transfers, and transformers' ZeRO-3 loading gathers a biased module's weight and bias together
    # (see axolotl_soka.tuner.distributed.coalesced_gather_is_safe)
    "zero_optimization": {
        "stage": 3,
        "stage3_param_persistence_threshold": 0,
        "stage3_allgather_sequential": True,
    },
    "zero_allow_untested_optimizer": True,
    "zero_force_ds_cpu_optimizer": False,
}
SOKA = dict(max_rank=3, svd="full", energy_threshold=0.5, min_rank=1)
GRAD_SOKA = dict(init="gradient", max_rank=2, svd="full", target_modules=["q_proj", "v_proj", "down_proj"])


def init_record(peft_model: torch.nn.Module) -> dict[str, dict]:
    """Per SoKA layer: rank, initial factors and the full (gathered) residual base weight."""
    record = {}
    for name, module in peft_model.named_modules():
        if isinstance(module, SokaLayer):
            base = module.get_base_layer()
            with gathered([base.weight]):
                record[name] = {
                    "rank": module.r["default"],
                    "A": module.soka_A["default"].detach().clone(),
                    "B": module.soka_B["default"].detach().clone(),
                    "s": module.soka_s["default"].detach().clone(),
                    "residual": base.weight.detach().clone(),
                }
    return record


def train_steps(peft_model: torch.nn.Module, batches: list[dict]) -> tuple[object, list[float]]:
    """``deepspeed.initialize`` with AdamW (lr 1e-2), then one optimiser step per batch; ``(engine, losses)``."""
    params = [p for p in peft_model.parameters() if p.requires_grad]
    engine, *_ = deepspeed.initialize(
        model=peft_model, optimizer=torch.optim.AdamW(params, lr=1e-2), config=DS_CONFIG
    )
    losses = []
    for batch in batches:
        loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()
        losses.append(float(loss))
    return engine, losses


class PathRecorder:
    """Records, per SoKA layer call, ``(biased, flattened, in_place)``: whether the base ``nn.Linear`` has a
    bias, whether the layer ran it on the flattened input and whether it added its product in place. Under
    ZeRO-3 the base layers carry DeepSpeed's fetch/release hooks, which the layer must recognise as harmless
    to take those paths."""

    def __init__(self) -> None:
        self.calls: list[tuple[bool, bool, bool]] = []
        self._flattened = False

    def __enter__(self) -> PathRecorder:
        self._saved = SokaLinear._flattens_input, SokaLinear._adds_in_place
        flattens, adds = self._saved
        recorder = self

        def _flattens_input(layer, x, args, kwargs):
            recorder._flattened = flattens(layer, x, args, kwargs)
            return recorder._flattened

        def _adds_in_place(layer, result, dtype):
            in_place = adds(layer, result, dtype)
            biased = layer.get_base_layer().bias is not None
            recorder.calls.append((biased, recorder._flattened, in_place))
            return in_place

        SokaLinear._flattens_input, SokaLinear._adds_in_place = _flattens_input, _adds_in_place
        return self

    def __exit__(self, *exc: object) -> None:
        SokaLinear._flattens_input, SokaLinear._adds_in_place = self._saved

    def summary(self) -> dict[str, int]:
        """Call counts: ``biased_flattened``, ``biased_not_flattened``, ``in_place``, ``out_of_place``."""
        return {
            "biased_flattened": sum(b and f for b, f, _ in self.calls),
            "biased_not_flattened": sum(b and not f for b, f, _ in self.calls),
            "in_place": sum(i for *_, i in self.calls),
            "out_of_place": sum(not i for *_, i in self.calls),
        }


def calibration_batches(count: int = 4) -> list[dict[str, torch.Tensor]]:
    """Fixed batches for the gradient calibration; process ``r`` of 2 takes ``[r::2]``."""
    g = torch.Generator().manual_seed(77)
    out = []
    for _ in range(count):
        ids = torch.randint(0, 100, (2, 10), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    return out


def gradient_run(model_dir: str, out_dir: str, rank: int) -> None:
    """Calibrate on the partitioned model (each process its own batches), init from the gradient, train 2 steps."""
    model = LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    config = SokaConfig(**GRAD_SOKA)
    batches = calibration_batches()[rank::2]
    calibration = axolotl_soka.calibrate_gradients(model, config, batches, progress=False)
    still = all(p.numel() == 0 for p in model.parameters())
    torch.save(
        {"gradients": calibration.gradients, "batches": calibration.batches, "partitioned_after": still},
        os.path.join(out_dir, f"grads{rank}.pt"),
    )
    peft_model = get_peft_model(model, config)
    record = init_record(peft_model)
    if rank == 0:
        torch.save(record, os.path.join(out_dir, "grad_init.pt"))
    _, losses = train_steps(peft_model, batches)
    with open(os.path.join(out_dir, f"grad_losses{rank}.json"), "w") as f:
        json.dump(losses, f)


def main(model_dir: str, out_dir: str) -> None:
    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    keep_alive = HfDeepSpeedConfig(DS_CONFIG)  # noqa: F841  (makes from_pretrained build under zero.Init)
    model = LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    q = model.model.layers[0].self_attn.q_proj.weight
    partitioned = bool(hasattr(q, "ds_id") and q.numel() == 0)
    start = time.perf_counter()
    peft_model = get_peft_model(model, SokaConfig(**SOKA))
    init_seconds = time.perf_counter() - start

    record = init_record(peft_model)
    if rank == 0:
        torch.save(record, os.path.join(out_dir, "init.pt"))

    torch.manual_seed(1234)
    ids = [torch.randint(0, 100, (1, 12)) for _ in range(2 * 4)]
    with PathRecorder() as paths:  # under DeepSpeed's hooks, registered by deepspeed.initialize
        engine, losses = train_steps(peft_model, [{"input_ids": x, "labels": x} for x in ids[rank::2]])
    engine.eval()
    probe = torch.arange(20).reshape(2, 10) % 100
    with torch.no_grad():
        logits = engine(input_ids=probe).logits
    adapter_dir = os.path.join(out_dir, "adapter")
    axolotl_soka.save_adapter(engine.module, adapter_dir)
    if rank == 0:
        torch.save({"logits": logits, "probe": probe}, os.path.join(out_dir, "trained.pt"))
    resumed = resume_logits(model_dir, adapter_dir, probe)
    if rank == 0:
        torch.save({"logits": resumed}, os.path.join(out_dir, "resumed.pt"))
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        info = {"partitioned": partitioned, "init_seconds": init_seconds, "losses": losses}
        json.dump(info | {"paths": paths.summary()}, f)
    gradient_run(model_dir, out_dir, rank)
    dist.barrier()


def resume_logits(model_dir: str, adapter_dir: str, probe: torch.Tensor) -> torch.Tensor:
    """Load the saved adapter onto a fresh partitioned model, as a resumed run does, with any SVD forbidden."""

    def no_svd(*args: object, **kwargs: object) -> None:
        raise AssertionError("an SVD ran while loading a saved adapter")

    model = LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    saved = (torch.linalg.svd, axolotl_soka.tuner.initializer.kpsvd)
    torch.linalg.svd, axolotl_soka.tuner.initializer.kpsvd = no_svd, no_svd
    try:
        loaded = PeftModel.from_pretrained(model, adapter_dir)
    finally:
        torch.linalg.svd, axolotl_soka.tuner.initializer.kpsvd = saved
    engine, *_ = deepspeed.initialize(model=loaded, config=DS_CONFIG)
    engine.eval()
    with torch.no_grad():
        return engine(input_ids=probe).logits


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
