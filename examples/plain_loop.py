"""GreenTrainer in a plain PyTorch loop: one `model.select_units(...)` call per epoch, no Trainer.

python examples/plain_loop.py                 # tiny config-built LLaMA, synthetic data, offline
python examples/plain_loop.py --model PATH    # a real causal LM
"""

import argparse

import torch
from peft import get_peft_model
from trainer_tensors import load

from peft_greentrainer import GreenTrainerConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--max-steps", type=int, default=None, help="steps per epoch (smoke tests)")
    args = parser.parse_args()

    base, dataset = load(args.model)
    model = get_peft_model(base, GreenTrainerConfig(rho=0.5, units="tensors"))
    model.train()
    loader = torch.utils.data.DataLoader(dataset.with_format("torch"), batch_size=4, shuffle=True)
    # Create the optimizer over every candidate first: selections only toggle requires_grad afterwards.
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for epoch in range(args.epochs):
        selection = model.select_units(loader, optimizer)  # importance from the first batches, then the DP
        print(f"epoch {epoch}: {int(selection.mask.sum())} units, {selection.ratio:.2f}x full FT FLOPs")
        for step, batch in enumerate(loader):
            if args.max_steps is not None and step >= args.max_steps:
                break
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)  # frozen units keep grad None, so AdamW skips them
        print(f"epoch {epoch}: loss {loss.item():.3f}")


if __name__ == "__main__":
    main()
