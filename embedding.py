"""
Texts as vectors: a model's final hidden states, mean-pooled over each text's tokens, then centered
and normalized. The one home of the embedding that similarity.py (section 5.2, GPT-2) and
TinyWorld's style claim (data/tinyworld/experiment.py) both use.
"""
import sys

import torch
import torch.nn.functional as F
from tqdm import tqdm

import chat
from cli import autocast
from model import EOT, varying_lengths


@torch.no_grad()
def embed(model, texts, device, dtype, batch_size=8):
    """One vector per text (N, C): the mean of the model's final hidden states over the text's
    tokens (its first block_size). The official plot_embeds.py mean-pools nomic-embed-text-v1 the
    same way; no such model can be downloaded here, so the base GPT-2 stands in for it (the model
    every compared model started from)."""
    out = []
    starts = range(0, len(texts), batch_size)
    for start in tqdm(starts, desc="embedding", unit="batch", file=sys.stderr, leave=False):
        ids = [chat.encode(text)[:model.config.block_size] or [EOT]
               for text in texts[start:start + batch_size]]
        T = max(len(seq) for seq in ids)
        x = torch.full((len(ids), T), EOT)
        mask = torch.zeros(len(ids), T)
        for b, seq in enumerate(ids):
            x[b, :len(seq)] = torch.tensor(seq)
            mask[b, :len(seq)] = 1
        with autocast(device, dtype), varying_lengths():
            # (B, T, C); real tokens never see the padding
            h = model.hidden(x.to(device)).float().cpu()
        out.append((h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True))
    return torch.cat(out)



def unit_vectors(vectors):
    """(N, C) embeddings -> (N, C) unit vectors, centered on the mean of all N first. GPT-2's hidden
    states share one large common direction (Ethayarajh, 2019: its last layer's cosines are all
    near 1), so without the centering every pair of texts would look alike. Center over everything
    that is compared together."""
    return F.normalize(vectors - vectors.mean(0), dim=1)
