"""GPT-2 in PyTorch, the model section of karpathy's build-nanogpt `train_gpt2.py`.

This is the reference that flax_gpt is checked against. Module names equal HuggingFace
GPT-2's (`transformer.h.0.attn.c_attn.weight`, ...), so state dict keys match HF's; only the
layout differs: nn.Linear weights are (out, in), HF Conv1D weights are (in, out).
"""

from __future__ import annotations

import inspect
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
from torch.nn import functional as F

# HF Conv1D weights, stored (in, out); nn.Linear stores (out, in).
CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Keys an HF GPT-2 file may hold that are no parameter of ours: the tied head, old causal-mask buffers.
IGNORED_KEYS = re.compile(r"^(lm_head\.weight|h\.\d+\.attn\.(bias|masked_bias))$")  # without 'transformer.'


@dataclass
class GPTConfig:
    block_size: int = 1024  # max sequence length
    vocab_size: int = 50257  # number of tokens: 50,000 BPE merges + 256 bytes tokens + 1 <|endoftext|>
    n_layer: int = 12  # number of layers
    n_head: int = 12  # number of heads
    n_embd: int = 768  # embedding dimension
    dropout: float = 0.0  # nanoGPT's dropout (embeddings, attention probabilities, attention and MLP outputs)
    gelu: str = "tanh"  # "tanh": GPT-2's approximation (build-nanogpt); "exact": erf, as nanoGPT's model.py


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # key, query, value for all heads
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)  # output projection
        self.c_proj.NANOGPT_SCALE_INIT = 1
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout

    def forward(self, x, masks=None):
        B, T, C = x.size()  # batch size, sequence length, embedding dimensionality (n_embd)
        qkv = self.c_attn(x)  # (B, T, 3C)
        q, k, v = qkv.split(self.n_embd, dim=2)  # each (B, T, C)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if masks is not None and self.training and self.dropout > 0:  # nanoGPT's attention written out, given masks
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))  # (B, nh, T, T)
            causal = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()  # (T, T)
            att = F.softmax(att.masked_fill(~causal, float("-inf")), dim=-1)  # (B, nh, T, T)
            y = dropout(att, self.dropout, True, masks["attn"]) @ v  # (B, nh, T, hs)
        else:
            p = self.dropout if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C) heads side by side
        y = self.c_proj(y)  # (B, T, C)
        return dropout(y, self.dropout, self.training, masks and masks["attn_proj"])  # nanoGPT's resid_dropout


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        # GPT-2's tanh GELU (build-nanogpt), or the exact erf one of nanoGPT's model.py
        self.gelu = {"tanh": nn.GELU(approximate="tanh"), "exact": nn.GELU()}[config.gelu]
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.c_proj.NANOGPT_SCALE_INIT = 1
        self.dropout = config.dropout

    def forward(self, x, mask=None):
        x = self.c_fc(x)  # (B, T, 4C)
        x = self.gelu(x)  # (B, T, 4C)
        x = self.c_proj(x)  # (B, T, C)
        return dropout(x, self.dropout, self.training, mask)


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=1e-5)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=1e-5)
        self.mlp = MLP(config)

    def forward(self, x, masks=None):
        x = x + self.attn(self.ln_1(x), masks)  # (B, T, C) pre-LN residual
        x = x + self.mlp(self.ln_2(x), masks and masks["mlp"])  # (B, T, C)
        return x


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, eps=1e-5),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight sharing scheme
        self.apply(self._init_weights)

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            std = 0.02
            if hasattr(module, "NANOGPT_SCALE_INIT"):
                std *= (2 * self.config.n_layer) ** -0.5  # residual projections scaled down
            torch.nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets=None, dropout_masks=None):
        """dropout_masks: the masks to drop with in train mode (flax_gpt's GPT.dropout_masks), else torch's own."""
        B, T = idx.size()  # idx is of shape (B, T)
        assert T <= self.config.block_size, f"Cannot forward sequence of length {T}, block size is only {self.config.block_size}"
        pos = torch.arange(0, T, dtype=torch.long, device=idx.device)  # (T,)
        pos_emb = self.transformer.wpe(pos)  # (T, C)
        tok_emb = self.transformer.wte(idx)  # (B, T, C)
        m = dropout_masks
        x = dropout(tok_emb + pos_emb, self.config.dropout, self.training, m and m["embd"])  # (B, T, C)
        for i, block in enumerate(self.transformer.h):
            x = block(x, m and {name: m[name][i] for name in ("attn", "attn_proj", "mlp")})  # (B, T, C)
        x = self.transformer.ln_f(x)  # (B, T, C)
        logits = self.lm_head(x).float()  # (B, T, vocab_size), float32 also under autocast
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))  # mean over B*T
        return logits, loss

    @classmethod
    def from_pretrained(cls, name_or_path: str) -> "GPT":
        """A GPT with the weights of an HF GPT-2 (hub id like 'gpt2', or a local directory)."""
        from transformers import GPT2LMHeadModel

        if os.path.isdir(name_or_path) and not os.path.isfile(os.path.join(name_or_path, "config.json")):
            # transformers would build the default 124M config and fail on (or mis-load) the weights
            raise FileNotFoundError(f"{name_or_path} has no config.json: not an HF GPT-2 checkpoint directory")
        hf_model, info = GPT2LMHeadModel.from_pretrained(name_or_path, output_loading_info=True)
        # transformers fills missing tensors with random init and only warns: a reference must not.
        missing = sorted(k for k in info.get("missing_keys", ()) if not _ignored(k))
        unexpected = sorted(k for k in info.get("unexpected_keys", ()) if not _ignored(k))
        if missing or unexpected or info.get("mismatched_keys"):
            raise ValueError(
                f"{name_or_path}: not a GPT-2 checkpoint of its config.json: missing={missing}, "
                f"unexpected={unexpected}, mismatched={sorted(info.get('mismatched_keys', ()))}"
            )
        hf_config = hf_model.config
        config = GPTConfig(
            block_size=hf_config.n_positions,
            vocab_size=hf_config.vocab_size,
            n_layer=hf_config.n_layer,
            n_head=hf_config.n_head,
            n_embd=hf_config.n_embd,
            gelu="exact" if hf_config.activation_function == "gelu" else "tanh",  # "gelu": torch's exact GELU
        )
        model = GPT(config)
        load_state_dict(model, hf_to_torch_state_dict(hf_model.state_dict()))
        return model

    def configure_optimizers(self, weight_decay: float, learning_rate: float, device_type: str,
                             skip: tuple[str, ...] = ()):
        """AdamW as build-nanogpt: weight decay on matmul weights and embeddings (dim >= 2) only; the parameters
        whose names end with one of `skip` are left out (another optimizer updates them)."""
        param_dict = {pn: p for pn, p in self.named_parameters()
                      if p.requires_grad and not pn.endswith(skip)}  # tied weight once
        decay_params = [p for n, p in param_dict.items() if p.dim() >= 2]
        nodecay_params = [p for n, p in param_dict.items() if p.dim() < 2]
        optim_groups = [
            {"params": decay_params, "weight_decay": weight_decay},
            {"params": nodecay_params, "weight_decay": 0.0},
        ]
        fused_available = "fused" in inspect.signature(torch.optim.AdamW).parameters
        use_fused = fused_available and device_type == "cuda"
        return torch.optim.AdamW(optim_groups, lr=learning_rate, betas=(0.9, 0.95), eps=1e-8, fused=use_fused)

    def configure_muon_optimizers(self, weight_decay: float, learning_rate: float, device_type: str,
                                  muon_lr: float = 0.01, muon_momentum: float = 0.95,
                                  muon_weight_decay: float = 0.0) -> list[torch.optim.Optimizer]:
        """[torch.optim.Muon on the blocks' weight matrices (CONV1D_SUFFIXES), AdamW as configure_optimizers on the
        rest]. Muon's group carries lr_ratio = muon_lr / learning_rate: train_step sets its lr to lr * lr_ratio."""
        matrices = [p for n, p in self.named_parameters() if p.requires_grad and n.endswith(CONV1D_SUFFIXES)]
        muon = torch.optim.Muon([{"params": matrices, "lr_ratio": muon_lr / learning_rate}], lr=muon_lr,
                                weight_decay=muon_weight_decay, momentum=muon_momentum, nesterov=True,
                                adjust_lr_fn=None)
        return [muon, self.configure_optimizers(weight_decay, learning_rate, device_type, skip=CONV1D_SUFFIXES)]


def dropout(x, p: float, training: bool, mask=None):
    """F.dropout(x, p, training), or with a given mask (True: kept) the same formula: x * mask / (1 - p)."""
    if mask is None or not training or p == 0:
        return F.dropout(x, p, training)
    mask = torch.from_numpy(np.array(mask)).to(x.device)  # a writable copy
    return x * (mask.to(x.dtype) / (1 - p))


# ----------------------------------------------------------------------------- HF state dicts


def _ignored(key: str) -> bool:
    return IGNORED_KEYS.match(key.removeprefix("transformer.")) is not None


def hf_to_torch_state_dict(hf_tensors: Mapping) -> dict[str, torch.Tensor]:
    """HF GPT-2 tensors (keys with or without 'transformer.') -> this GPT's state dict keys.

    Conv1D weights are transposed to nn.Linear's (out, in); `lm_head.weight` (tied to wte) and
    the causal-mask buffers `attn.bias` / `attn.masked_bias` are dropped. Values are copies.
    """
    out = {}
    for key, value in hf_tensors.items():
        if _ignored(key):
            continue
        name = "transformer." + key.removeprefix("transformer.")
        if isinstance(value, torch.Tensor):
            tensor = value.detach().clone()
        else:
            tensor = torch.from_numpy(np.array(value))  # a writable copy (jax/safetensors arrays are read-only)
        if name.endswith(CONV1D_SUFFIXES):
            tensor = tensor.t()  # (in, out) -> (out, in)
        out[name] = tensor.contiguous()
    return out


def torch_to_hf_state_dict(model: GPT) -> dict[str, np.ndarray]:
    """This GPT's parameters as HF GPT-2 tensors: 'transformer.' keys, Conv1D (in, out), float32."""
    out = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":  # tied to transformer.wte.weight
            continue
        value = tensor.detach().to("cpu", torch.float32)
        if name.endswith(CONV1D_SUFFIXES):
            value = value.t()  # (out, in) -> (in, out)
        out[name] = np.array(value.numpy(), order="C")  # a copy: later training must not change it
    return out


def load_state_dict(model: GPT, state_dict: Mapping[str, torch.Tensor]) -> GPT:
    """Copy a hf_to_torch_state_dict into model; every parameter but the tied lm_head must be there."""
    expected = set(model.state_dict()) - {"lm_head.weight"}
    if missing := sorted(expected - set(state_dict)):
        raise ValueError(f"state dict is missing {missing}")
    if unexpected := sorted(set(state_dict) - expected):
        raise ValueError(f"state dict has unexpected keys {unexpected}")
    model.load_state_dict(state_dict, strict=False)  # lm_head.weight is wte.weight: loaded with it
    return model
