"""Student models: a causal LM, optionally fed an MRI volume as prefix embeddings.

The MRI+text student is Frozen/LLaVA-style: a 3D MONAI encoder turns the volume
into one feature vector, a linear projector turns that into `prefix_tokens`
embeddings of the LM's width, and those embeddings go in front of the prompt's
token embeddings. The text student is the same model without the encoder, so
training, scoring and generation share one code path (`embed`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from transformers import PreTrainedModel

from radiag.students.config import EncoderName
from radiag.students.formatting import IGNORE


def build_encoder(name: EncoderName, feature_dim: int, spatial_size: Sequence[int]) -> nn.Module:
    """A 3D MONAI network trained from scratch: (B, 1, D, H, W) -> (B, feature_dim).

    DenseNets use instance norm: per-worker batches of 1-4 volumes make batch norm noise.
    `densenet_small` downsamples 16x (DenseNet121: 32x), so 32^3 inputs still leave 2^3
    voxels for the last norm.
    """
    from monai.networks.nets import DenseNet, ViT

    if name == "densenet121":
        return DenseNet(
            spatial_dims=3, in_channels=1, out_channels=feature_dim,
            norm=("instance", {"affine": True}),
        )  # fmt: skip
    if name == "densenet_small":
        return DenseNet(
            spatial_dims=3, in_channels=1, out_channels=feature_dim, init_features=16,
            growth_rate=16, block_config=(2, 2, 2), norm=("instance", {"affine": True}),
        )  # fmt: skip
    return _VitEncoder(
        ViT(
            in_channels=1, img_size=tuple(spatial_size), patch_size=16, hidden_size=192,
            mlp_dim=768, num_layers=6, num_heads=6, classification=True, num_classes=feature_dim,
            post_activation="none",
        )
    )  # fmt: skip


class _VitEncoder(nn.Module):
    """MONAI's ViT returns (logits, hidden states); keep the logits."""

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.vit = vit

    def forward(self, volumes: torch.Tensor) -> torch.Tensor:
        return self.vit(volumes)[0]


class MriPrefix(nn.Module):
    """Volume -> `prefix_tokens` LM embeddings: (B, 1, D, H, W) -> (B, P, hidden).

    `token_norm` (the LM's mean token-embedding norm, when given) sets the projector's
    initial scale: fresh prefix tokens then start as long as the text's own. With PyTorch's
    default init they start about four times longer for SmolLM2, and a short fine-tune
    spends its steps undoing that disturbance of the text instead of learning the task.
    """

    def __init__(
        self,
        encoder: nn.Module,
        feature_dim: int,
        hidden_size: int,
        prefix_tokens: int,
        token_norm: float | None = None,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.prefix_tokens = prefix_tokens
        projection = nn.Linear(feature_dim, prefix_tokens * hidden_size)
        if token_norm is not None:  # LayerNorm'd features: each output ~ N(0, F * std^2)
            nn.init.normal_(projection.weight, std=token_norm / (feature_dim * hidden_size) ** 0.5)
            nn.init.zeros_(projection.bias)
        self.projector = nn.Sequential(nn.LayerNorm(feature_dim), projection)

    def forward(self, volumes: torch.Tensor) -> torch.Tensor:
        features = self.encoder(volumes)  # (B, F)
        return self.projector(features).view(volumes.shape[0], self.prefix_tokens, -1)


class StudentModel(nn.Module):
    """A causal LM with an optional MRI prefix. Batches are lists of token ids: `embed`
    builds the padded embeddings, so the prefix, padding and labels always line up."""

    def __init__(self, lm: PreTrainedModel, mri: MriPrefix | None, pad_token_id: int) -> None:
        super().__init__()
        self.lm = lm
        self.mri = mri
        self.pad_token_id = pad_token_id

    @property
    def prefix_tokens(self) -> int:
        return self.mri.prefix_tokens if self.mri is not None else 0

    def pad(
        self, ids: Sequence[Sequence[int]], pad_left: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids as one (B, longest row) tensor, with pad tokens, and its attention mask."""
        width = max(len(row) for row in ids)
        padded = torch.full((len(ids), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for i, row in enumerate(ids):
            span = slice(width - len(row), width) if pad_left else slice(0, len(row))
            padded[i, span] = torch.tensor(row, dtype=torch.long)
            mask[i, span] = 1
        return padded, mask

    def embed(
        self,
        ids: Sequence[Sequence[int]],
        volumes: torch.Tensor | None = None,
        pad_left: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings and attention mask of `[MRI prefix][tokens]` per row, padded.

        Padding goes on the right for training, on the left for generation and option
        scoring (the next token then follows the last real token of every row).
        """
        embedding = self.lm.get_input_embeddings()
        device = embedding.weight.device
        padded, mask = self.pad(ids, pad_left)
        width = padded.shape[1]
        tokens = embedding(padded.to(device))  # (B, T, hidden)
        mask = mask.to(device)
        if self.mri is None:
            return tokens, mask
        if volumes is None:
            raise ValueError("the MRI+text student needs a volume for every row")
        prefix = self.mri(volumes.to(device)).to(tokens.dtype)  # (B, P, hidden)
        prefix_mask = torch.ones(prefix.shape[:2], dtype=torch.long, device=device)
        if pad_left:  # [pads][prefix][tokens]: move each row's padding in front of its prefix
            rows = [
                torch.cat([tokens[i, : width - len(row)], prefix[i], tokens[i, width - len(row) :]])
                for i, row in enumerate(ids)
            ]
            masks = [
                torch.cat(
                    [mask[i, : width - len(row)], prefix_mask[i], mask[i, width - len(row) :]]
                )
                for i, row in enumerate(ids)
            ]
            return torch.stack(rows), torch.stack(masks)
        return torch.cat([prefix, tokens], dim=1), torch.cat([prefix_mask, mask], dim=1)

    def forward(
        self,
        ids: Sequence[Sequence[int]],
        labels: Sequence[Sequence[int]],
        volumes: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Next-token loss of every label: (B, L), L = longest `labels` row; 0 where a label
        is IGNORE or past the row's end. Callers sum it over the tokens they care about."""
        inputs, mask = self.embed(ids, volumes)
        batch, width = inputs.shape[:2]
        start = self.prefix_tokens
        target = torch.full((batch, width), IGNORE, dtype=torch.long, device=inputs.device)
        for i, row in enumerate(labels):
            target[i, start : start + len(row)] = torch.tensor(row, device=inputs.device)
        following = target[:, 1:]
        # Logits only where a next token is labelled: the vocabulary projection of every
        # prompt position would cost more than the rest of a small model.
        keep = (following != IGNORE).any(dim=0).nonzero().squeeze(1)
        logits = self.lm(
            inputs_embeds=inputs, attention_mask=mask, logits_to_keep=keep, use_cache=False
        ).logits
        kept = nn.functional.cross_entropy(
            logits.float().transpose(1, 2),
            following[:, keep],
            ignore_index=IGNORE,
            reduction="none",
        )  # (B, kept positions)
        # By input position. Its dtype is explicit: another thread loading a model (a served
        # student's hot swap) changes torch's process-wide default dtype while it loads.
        per_position = torch.zeros((batch, width), dtype=kept.dtype, device=inputs.device)
        per_position[:, keep + 1] = kept
        return per_position[:, start : start + max(len(row) for row in labels)]

    def option_nll(
        self,
        prefixes: Sequence[Sequence[int]],
        options: Sequence[Sequence[int]],
        volumes: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Summed negative log-likelihood of every option right after every prefix: (B, O).

        Each prefix is forwarded once and its key/value cache repeated for the options,
        which are forwarded together: scoring `prefix + option` as one sequence per option
        forwarded the prefix, by far the longer part, once per option. Prefixes are padded
        on the left, so that each one's next-token logits sit in the last column, with
        position ids that skip the padding, as in training.
        """
        inputs, mask = self.embed(prefixes, volumes, pad_left=True)
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        prefix_pass = self.lm(
            inputs_embeds=inputs, attention_mask=mask, position_ids=positions, use_cache=True,
            logits_to_keep=1,
        )  # fmt: skip
        after_prefix = torch.log_softmax(prefix_pass.logits[:, -1].float(), dim=-1)  # (B, V)
        rows, count = len(prefixes), len(options)
        option_ids, option_mask = (t.to(inputs.device) for t in self.pad(options))
        width, device = option_ids.shape[1], inputs.device
        first = after_prefix[:, option_ids[:, 0]]  # (B, O): each option's first token
        if width == 1:
            return -first
        cache = prefix_pass.past_key_values
        cache.batch_repeat_interleave(count)  # row i * O + j: option j after prefix i
        ids = option_ids[:, :-1].repeat(rows, 1)  # the last token predicts nothing scored
        option_pass = self.lm(
            input_ids=ids,
            attention_mask=torch.cat(
                [mask.repeat_interleave(count, dim=0), option_mask[:, :-1].repeat(rows, 1)], dim=1
            ),
            position_ids=positions[:, -1:].repeat_interleave(count, dim=0)
            + torch.arange(1, width, device=device),
            past_key_values=cache,
        )
        following = torch.log_softmax(option_pass.logits.float(), dim=-1).gather(
            -1, option_ids[:, 1:].repeat(rows, 1).unsqueeze(-1)
        )  # (B * O, width - 1, 1): each later option token after the ones before it
        later = (following.squeeze(-1) * option_mask[:, 1:].repeat(rows, 1)).sum(dim=1)
        return -(first + later.view(rows, count))


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights that train (all of them, or LoRA + MRI side), on the CPU."""
    return {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}


class StudentWeightsError(ValueError):
    """Saved student weights that do not fit the model they are loaded into."""


def require_exact_keys(missing: Sequence[str], unexpected: Sequence[str], what: str) -> None:
    """Raise unless a weight load matched key for key (`what` names the weights).

    Raises:
        StudentWeightsError: naming the missing and unexpected keys.
    """
    if missing or unexpected:
        raise StudentWeightsError(
            f"{what} do not fit the model: missing keys {sorted(missing)}, "
            f"unexpected keys {sorted(unexpected)}"
        )


def load_trainable(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load `trainable_state` output into `model`, refusing any key mismatch.

    The frozen base weights are not in `state`, so `load_state_dict` must run with
    strict=False; without this check a renamed or missing LoRA key would silently
    leave the base model's weights in place.

    Raises:
        StudentWeightsError: naming the missing and unexpected keys.
    """
    expected = {n for n, p in model.named_parameters() if p.requires_grad}
    require_exact_keys(
        list(expected - state.keys()), list(state.keys() - expected), "student weights"
    )
    model.load_state_dict(state, strict=False)
