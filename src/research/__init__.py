"""The research room: the only code an agent may patch (search.editable: src/research/*.py).

model.py (the GPT), optim.py (the optimizer), step.py (one optimizer step). They import only torch, the standard
math modules and the harness's config schemas (the static contract, src/lab/contract.py).

The research contract: all that the harness and the lab rely on from this room (program.md lists the same):

- `GPTConfig.from_model_config(cfg.model, vocab_size)`: the model's config from the model knobs (ValueError on a
  bad knob)
- `GPT(config)`: a torch `nn.Module` (the harness moves it to the device, switches train/eval, saves its
  `state_dict` and the scorer loads it back)
- `model.init_weights()`: initialize the parameters in place, before training
- `model(idx) -> logits`: token ids (B, T) in, float logits (B, T, vocab_size) out, nothing else; causal, each row
  on its own, no state kept between calls
- `build_optimizer(model, cfg.optimizer) -> opt`: whatever `train_step` takes; the harness never looks inside
- `train_step(model, opt, next_batch, *, step, progress, lr_mult, accum, optim_cfg, autocast) -> loss`: one
  optimizer step of `accum` micro-batches from `next_batch()`, at the harness's LR multiplier `lr_mult`
  (warm-up and warmdown by budget progress); the loss is a scalar tensor

Nothing else is asked of the model: parameter counts, FLOPs per token (so MFU) and attention windows are the
harness's, computed from the config (src/harness/model_facts.py), and device.compile_scope=blocks compiles each
module of the model's `nn.ModuleList`s. Everything behind these names is yours to change.
tests/research/test_contract_doc.py checks this list against program.md and the harness's imports.

Usage: from src.research.model import GPT, GPTConfig
"""
