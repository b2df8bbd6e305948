#!/usr/bin/env python3
"""PyTorch's own torch.optim.Adam on a fixed problem, for the unit tests of the
adam and adamw optimizer plugins (plugins/optimizers/adam/test_adam.cpp,
plugins/optimizers/adamw/test_adamw.cpp).

  adam_reference.py [--adamw] run LR BETA1 BETA2 WEIGHT_DECAY STEPS [STATE_FILE]
      Builds the parameters, runs STEPS steps with the printed gradients and
      prints everything the C++ test needs; writes optimizer.state_dict() to
      STATE_FILE with torch.save when given.
  adam_reference.py [--adamw] load STATE_FILE
      Loads a state_dict written by the C++ plugin (torch::pickle_save) after
      STEPS steps of "run" into a torch.optim.Adam over the parameters of that
      step, prints its hyper-parameters and state and the parameters after one
      more step with the gradients of step STEPS + 1.

--adamw uses torch.optim.AdamW (decoupled weight decay) instead of Adam.

Output: one line per tensor, "TAG INDEX v0 v1 ...", values as repr(float) of
the float32 values (exact); "shape INDEX d0 d1 ..." gives the shapes, and
"group KEY v..." the hyper-parameters. Parameter 1 gets a gradient on even
steps only (its step count lags), parameter 2 never gets one (no state).
"""
import sys

import torch
import torch.jit._pickle

SHAPES = [(16, 20), (5,), (2, 2), ()]
OPTIMIZER = torch.optim.Adam


def make_params():
    gen = torch.Generator().manual_seed(1234)
    return [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]


def grad(step, index):
    """The gradient of parameter `index` at step `step` (1-based), or None."""
    if index == 2 or (index == 1 and step % 2 == 1):
        return None
    gen = torch.Generator().manual_seed(100 * step + index)
    return torch.randn(SHAPES[index], generator=gen) * (0.5 + index)


def emit(tag, index, tensor):
    values = " ".join(repr(float(v)) for v in tensor.detach().reshape(-1).tolist())
    print(f"{tag} {index} {values}".rstrip())


def emit_state(opt, params):
    for i, p in enumerate(params):
        state = opt.state.get(p)
        if not state:
            continue
        emit("step", i, state["step"].reshape(1))
        emit("exp_avg", i, state["exp_avg"])
        emit("exp_avg_sq", i, state["exp_avg_sq"])


def run(lr, beta1, beta2, weight_decay, steps, state_file=None):
    params = make_params()
    opt = OPTIMIZER(params, lr=lr, betas=(beta1, beta2), eps=1e-6,
                           weight_decay=weight_decay, foreach=False)
    for i, p in enumerate(params):
        print(f"shape {i} " + " ".join(str(d) for d in p.shape))
        emit("init", i, p)
    for step in range(1, steps + 1):
        for i, p in enumerate(params):
            p.grad = grad(step, i)
            if p.grad is not None:
                emit(f"grad{step}", i, p.grad)
        opt.step()
        for i, p in enumerate(params):
            emit(f"param{step}", i, p)
    emit_state(opt, params)
    if state_file:
        torch.save(opt.state_dict(), state_file)


def load(state_file):
    # torch::pickle_save tags every dict and list with its C++ type through
    # this function, which weights_only loading refuses unless allowed.
    with torch.serialization.safe_globals([torch.jit._pickle.restore_type_tag]):
        saved = torch.load(state_file, weights_only=True)
    group = saved["param_groups"][0]
    print("group keys " + " ".join(group.keys()))
    print("group lr " + repr(float(group["lr"])))
    print("group betas " + " ".join(repr(float(b)) for b in group["betas"]))
    print("group betas_type " + type(group["betas"]).__name__)
    print("group weight_decay " + repr(float(group["weight_decay"])))
    print("group decoupled_weight_decay " + repr(group["decoupled_weight_decay"]))
    # The parameters where the C++ run left them: replay its steps here.
    step = max(int(s["step"]) for s in saved["state"].values())
    params = make_params()
    replay = OPTIMIZER(params, lr=group["lr"], betas=group["betas"], eps=1e-6,
                              weight_decay=group["weight_decay"], foreach=False)
    for k in range(1, step + 1):
        for i, p in enumerate(params):
            p.grad = grad(k, i)
        replay.step()
    # Everything else comes from the C++ state: other hyper-parameters on purpose.
    opt = OPTIMIZER(params, lr=0.5, betas=(0.5, 0.5), eps=1e-6, weight_decay=0.0,
                           foreach=False)
    opt.load_state_dict(saved)
    emit_state(opt, params)
    for i, p in enumerate(params):
        p.grad = grad(step + 1, i)
    opt.step()
    for i, p in enumerate(params):
        emit("next", i, p)


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["--adamw"]:
        OPTIMIZER = torch.optim.AdamW
        args = args[1:]
    if len(args) in (6, 7) and args[0] == "run":
        run(float(args[1]), float(args[2]), float(args[3]), float(args[4]), int(args[5]),
            args[6] if len(args) == 7 else None)
    elif len(args) == 2 and args[0] == "load":
        load(args[1])
    else:
        sys.exit(__doc__)
