"""A Laplace approximation over the LoRA parameters of a tiny GPT-2 sequence classifier.

The setting of laplace-torch's LLM example, at toy size and without downloads: a GPT-2
classifier built from a config, peft LoRA adapters on its attention projection (the only
trainable parameters), a wrapper module that takes the tokenizer-style dict batch and
returns logits, and a DataLoader of dict batches. The task is synthetic: a sequence is
labelled 1 if token 3 occurs in it, some sequences are right-padded.

1. Train the LoRA parameters (MAP) for a few steps.
2. Fit ``Laplace(..., subset_of_weights="all", hessian_structure="kron")`` with curvlib's
   autograd backend (``laplace_backend("autograd", "ggn")``): K-FAC over the LoRA weights,
   which peft implements as ``nn.Linear`` layers applied at every position.
3. Tune the prior precision by the marginal likelihood and compare the MAP predictive with
   the linearized (GLM, probit) Laplace predictive on held-out sequences. On this easy,
   in-distribution task the MAP is already cautious and the Laplace predictive is a little
   more so; the point is the pipeline, which is laplace-torch's own with curvlib inside.

Run: ``python examples/llm_lora_laplace.py`` (about 10 s of CPU time; ``--small``: fewer
training steps and data points).
"""

import argparse
import os
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is built from configs

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

torch.set_num_threads(1)
parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--small", action="store_true", help="a smaller run (seconds)")
small = parser.parse_args().small
N_TRAIN, N_TEST, STEPS = (64, 64, 60) if small else (128, 128, 150)
L, VOCAB = 8, 20


class Classifier(nn.Module):
    """laplace-torch's LLM-example wrapper: ``forward(batch: dict) -> logits``."""

    def __init__(self, hf_model: nn.Module) -> None:
        super().__init__()
        self.hf_model = hf_model

    def forward(self, batch: dict) -> torch.Tensor:
        out = self.hf_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return out.logits


def data(n: int, gen: torch.Generator) -> list[dict]:
    ids = torch.randint(4, VOCAB, (n, L), generator=gen)
    has = torch.rand(n, generator=gen) < 0.5
    pos = torch.randint(0, L - 2, (n,), generator=gen)
    ids[has, pos[has]] = 3
    mask = torch.ones(n, L, dtype=torch.long)
    short = torch.rand(n, generator=gen) < 0.3
    mask[short, L - 2 :] = 0  # right padding (token 0)
    ids[mask == 0] = 0
    labels = ((ids == 3).any(1)).long()
    return [{"input_ids": ids[i], "attention_mask": mask[i], "labels": labels[i]} for i in range(n)]


def build() -> nn.Module:
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2ForSequenceClassification

    config = GPT2Config(
        n_embd=32, n_layer=2, n_head=2, vocab_size=VOCAB, n_positions=L, num_labels=2,
        pad_token_id=0, bos_token_id=1, eos_token_id=1, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, summary_first_dropout=0.0,  # no dropout: reproducible training
    )  # fmt: skip
    hf = GPT2ForSequenceClassification(config)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = get_peft_model(hf, lora)
    for name, p in hf.named_parameters():  # the classification head stays frozen, as in
        p.requires_grad_("lora_" in name)  # laplace-torch's example (LoRA only)
    return Classifier(hf).double()


def evaluate(probs: torch.Tensor, labels: torch.Tensor) -> str:
    nll = -probs[torch.arange(len(labels)), labels].log().mean()
    acc = (probs.argmax(-1) == labels).double().mean()
    conf = probs.max(-1).values.mean()
    return f"accuracy {acc:.3f}  mean confidence {conf:.3f}  NLL {nll:.4f}"


def main() -> None:
    with warnings.catch_warnings():  # laplace-torch imports asdfghjkl (torch.jit.script)
        warnings.simplefilter("ignore", FutureWarning)
        from laplace import Laplace

        from curvlib.integrations.laplace import laplace_backend

    t0 = time.process_time()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the model's initialization (and LoRA's)
        model = build()
    gen = torch.Generator().manual_seed(1)
    train, test = data(N_TRAIN, gen), data(N_TEST, gen)
    loader = DataLoader(train, batch_size=16, shuffle=True, generator=gen)
    params = [p for p in model.parameters() if p.requires_grad]
    print(f"LoRA parameters: {sum(p.numel() for p in params)} of "
          f"{sum(p.numel() for p in model.parameters())}")  # fmt: skip

    opt = torch.optim.Adam(params, lr=3e-2)
    model.train()
    step = 0
    while step < STEPS:
        for batch in loader:
            loss = nn.functional.cross_entropy(model(batch), batch["labels"])
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
            if step == STEPS:
                break
    model.eval()
    print(f"MAP training loss (last batch) {loss.item():.4f}")

    la = Laplace(
        model,
        "classification",
        subset_of_weights="all",
        hessian_structure="kron",
        backend=laplace_backend("autograd", "ggn"),
    )
    la.fit(DataLoader(train, batch_size=16), progress_bar=False)
    with warnings.catch_warnings():  # laplace-torch's reminder that probit is the default
        warnings.filterwarnings("ignore", message="By default `link_approx`")
        la.optimize_prior_precision(method="marglik", n_steps=50 if small else 100)
    print(f"prior precision {la.prior_precision.item():.3f}  "
          f"log marginal likelihood {la.log_marginal_likelihood().item():.3f}")  # fmt: skip

    test_batch = next(iter(DataLoader(test, batch_size=len(test))))
    labels = test_batch["labels"]
    with torch.no_grad():
        map_probs = torch.softmax(model(test_batch), -1)
    la_probs = la(test_batch, pred_type="glm", link_approx="probit")
    print(f"held-out, MAP:     {evaluate(map_probs, labels)}")
    print(f"held-out, Laplace: {evaluate(la_probs, labels)}")
    print(f"CPU time {time.process_time() - t0:.1f} s")


if __name__ == "__main__":
    main()
