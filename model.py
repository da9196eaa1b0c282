"""
Qwen2.5-VL in plain PyTorch: the config, the vision tower, the language model, M-RoPE positions,
attention that reads and writes a preallocated KV cache, and load/save of HF-layout checkpoints.

    model = load_model("Qwen2.5-VL-7B-Instruct", dtype=torch.bfloat16, device="cuda")
    logits = model(input_ids, attention_mask, pixel_values, image_grid_thw)   # (B, T, vocab)

The parameter names mirror the official checkpoints (`model.layers.0.self_attn.q_proj.weight`,
`visual.blocks.0.attn.qkv.weight`, `visual.merger.mlp.0.weight`, `lm_head.weight`), so loading is
a plain name map. Agreement with transformers' Qwen2_5_VLForConditionalGeneration is tested to
float32 precision (tests/test_model.py). No transformers import here.

How this departs from transformers' implementation (same numbers, simpler code):
- Window attention in the vision tower: the patches are put in window order once (like
  transformers' window index) and windows of equal size are batched into one attention call with
  no mask; full attention likewise batches the frames of equal size. No variable-length kernel.
- Grouped-query attention folds the query heads that share a K/V head into the query length,
  so K/V are never copied `n_rep` times (same math, works with every SDPA backend).
- The KV cache is one preallocated tensor per layer, written in place; a row's padding is
  marked invalid in a (B, S) mask and each row carries its own M-RoPE position.
- Also loads text-only Qwen2 checkpoints (`model_type: qwen2`, e.g. DeepSeek-R1-Distill-Qwen):
  the same decoder; M-RoPE with equal t/h/w positions *is* ordinary 1D RoPE, so no second model.
"""

import json
import math
import os
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# Config: read from a checkpoint's config.json (official flat form or transformers-5 nested form)


@dataclass
class VisionConfig:
    depth: int = 32
    hidden_size: int = 1280
    intermediate_size: int = 3420
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112            # pixels: 112 px = 8x8 patches = 4x4 merged tokens
    out_hidden_size: int = 3584       # = the language model's hidden_size
    fullatt_block_indexes: list = field(default_factory=lambda: [7, 15, 23, 31])
    tokens_per_second: int = 2        # video only; kept so save/load round-trips
    hidden_act: str = "silu"


@dataclass
class Config:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    rope_theta: float = 1000000.0
    mrope_section: list | None = None  # e.g. [16, 24, 24]: rotary freqs taken from t, h, w positions
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 128000
    hidden_act: str = "silu"
    bos_token_id: int | None = 151643
    eos_token_id: int | list | None = 151645
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    model_type: str = "qwen2_5_vl"
    vision: VisionConfig | None = None  # None for a text-only qwen2 checkpoint

    @property
    def head_dim(self):
        return self.hidden_size // self.num_attention_heads


MODEL_TYPES = ("qwen2_5_vl", "qwen2")
TEXT_REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads")
VISION_REQUIRED = ("depth", "hidden_size", "intermediate_size", "num_heads", "out_hidden_size")


def config_from_dict(d, source="config.json"):
    """Parse either form of config.json. Errors name the file and the missing/unknown field."""
    model_type = d.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ValueError(f"{source}: unknown model_type {model_type!r} (supported: {MODEL_TYPES})")
    text = dict(d.get("text_config") or {})
    text = {**{k: v for k, v in d.items() if k not in ("text_config", "vision_config")}, **text}
    for k in TEXT_REQUIRED:
        if k not in text:
            raise ValueError(f"{source}: missing field {k!r}")
    # rotary: flat form has rope_theta + rope_scaling {type: mrope, mrope_section}; nested form has
    # rope_parameters {rope_theta, mrope_section, rope_type}
    rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
    theta = rope.get("rope_theta", text.get("rope_theta"))
    if theta is None:
        raise ValueError(f"{source}: missing field 'rope_theta'")
    section = rope.get("mrope_section")
    if model_type == "qwen2_5_vl" and section is None:
        raise ValueError(f"{source}: missing field 'rope_scaling.mrope_section'")
    # text-only qwen2 (DeepSeek-R1-Distill-Qwen): plain RoPE is M-RoPE with t = h = w, which is
    # what mrope_section None gives (TextModel.rope). Long-context variants we do not implement
    # (YaRN rope scaling, sliding-window layers) are refused rather than silently run wrong.
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "mrope"):
        raise ValueError(f"{source}: rope type {rope_type!r} not supported (default or mrope only)")
    if text.get("use_sliding_window") and "sliding_attention" in (text.get("layer_types") or ["sliding_attention"]):
        raise ValueError(f"{source}: use_sliding_window true is not supported (full attention only)")
    tie = d.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
    cfg = Config(
        vocab_size=text["vocab_size"], hidden_size=text["hidden_size"],
        intermediate_size=text["intermediate_size"], num_hidden_layers=text["num_hidden_layers"],
        num_attention_heads=text["num_attention_heads"],
        num_key_value_heads=text.get("num_key_value_heads") or text["num_attention_heads"],
        rope_theta=float(theta), mrope_section=list(section) if section else None,
        rms_norm_eps=text.get("rms_norm_eps", 1e-6), tie_word_embeddings=bool(tie),
        max_position_embeddings=text.get("max_position_embeddings", 128000),
        hidden_act=text.get("hidden_act", "silu"), bos_token_id=text.get("bos_token_id"),
        eos_token_id=text.get("eos_token_id"), model_type=model_type,
    )
    if text.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{source}: hidden_act {text['hidden_act']!r} not supported (silu only)")
    if model_type == "qwen2_5_vl":
        for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
            if k in d:
                setattr(cfg, k, d[k])
        v = d.get("vision_config")
        if v is None:
            raise ValueError(f"{source}: missing field 'vision_config'")
        for k in VISION_REQUIRED:
            if k not in v:
                raise ValueError(f"{source}: missing field 'vision_config.{k}'")
        known = VisionConfig.__dataclass_fields__
        cfg.vision = VisionConfig(**{k: v[k] for k in known if k in v})
        cfg.vision.in_channels = v.get("in_chans", v.get("in_channels", 3))  # flat says in_chans
        cfg.vision.fullatt_block_indexes = list(cfg.vision.fullatt_block_indexes)
    return cfg


def config_to_dict(cfg):
    """The official flat layout (what Qwen/Qwen2.5-VL-*-Instruct ships)."""
    d = {k: v for k, v in asdict(cfg).items() if k not in ("vision", "mrope_section", "rope_theta")}
    d["rope_theta"] = cfg.rope_theta
    d["use_sliding_window"] = False
    d["num_key_value_heads"] = cfg.num_key_value_heads
    if cfg.model_type == "qwen2_5_vl":
        d["architectures"] = ["Qwen2_5_VLForConditionalGeneration"]
        d["rope_scaling"] = {"type": "mrope", "mrope_section": cfg.mrope_section}
        v = asdict(cfg.vision)
        v["in_chans"] = v.pop("in_channels")
        d["vision_config"] = v
    else:
        d["architectures"] = ["Qwen2ForCausalLM"]
        for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
            d.pop(k)
    return d


def load_config(path):
    f = os.path.join(path, "config.json")
    if not os.path.isfile(f):
        raise FileNotFoundError(f"{f}: no config.json in the checkpoint directory")
    with open(f) as fh:
        return config_from_dict(json.load(fh), source=f)

# -----------------------------------------------------------------------------
# Small pieces shared by the vision tower and the language model


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # normalize in float32, scale in the input dtype (as the reference does)
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). Biases in the vision tower, none in the LM."""

    def __init__(self, dim, hidden, bias):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x, cos, sin):
    return x * cos + rotate_half(x) * sin

# -----------------------------------------------------------------------------
# Vision tower: 14x14 patches -> blocks with (window) attention -> 2x2 PatchMerger -> LM width


def vision_layout(grid_thw, merge, window):
    """Per patch, in the processor's order (t, h/2, w/2, 2, 2) for each image in turn:
    its row and column in the patch grid, which frame it is in (full attention stays inside a
    frame), and which window (window attention stays inside `window` x `window` merged tokens;
    windows at the right/bottom edge are smaller when the grid is not a multiple).
    Returns four (N,) long tensors."""
    hpos, wpos, frame, win = [], [], [], []
    n_frames = n_windows = 0
    for t, h, w in grid_thw.tolist():
        hb, wb = h // merge, w // merge          # merged-token grid
        nwh, nww = -(-hb // window), -(-wb // window)
        tt, bh, bw, i, j = torch.meshgrid(*(torch.arange(n) for n in (t, hb, wb, merge, merge)),
                                          indexing="ij")
        hpos.append((bh * merge + i).flatten())
        wpos.append((bw * merge + j).flatten())
        frame.append((n_frames + tt).flatten())
        win.append((n_windows + tt * nwh * nww + (bh // window) * nww + bw // window).flatten())
        n_frames += t
        n_windows += t * nwh * nww
    return torch.cat(hpos), torch.cat(wpos), torch.cat(frame), torch.cat(win)


def attention_groups(frame, win):
    """Put the patches in window order: each window's patches contiguous (in their own order,
    so each 2x2 merge unit stays 4 consecutive rows), the windows of a frame contiguous and, in a
    frame, sorted largest first. Then attention needs no mask: a run of equal-size groups is one
    batched call on a (groups, size) view.
    frame, win (N,) long (from vision_layout) -> order (N,) long, the patches in window order;
    win_segs, full_segs: lists of (start, end, size): positions [start, end) of the reordered
    sequence are (end - start) / size groups of `size` patches that attend among themselves
    (windows, or whole frames)."""
    N = len(frame)
    size = torch.bincount(win)                                             # (n_windows,)
    win_frame = torch.zeros_like(size).scatter_(0, win, frame)
    rank = torch.empty_like(size)
    rank[torch.sort(win_frame * (N + 1) + N - size, stable=True).indices] = torch.arange(len(size))
    order = torch.sort(rank[win], stable=True).indices                     # patches by window rank

    def runs(sizes):  # consecutive equal sizes -> (start, end, size)
        segs, s = [], 0
        for n in sizes:
            if segs and segs[-1][2] == n:
                segs[-1][1] += n
            else:
                segs.append([s, s + n, n])
            s += n
        return [tuple(x) for x in segs]
    win_sizes = size[torch.argsort(rank)].tolist()                          # in window order
    return order, runs(win_sizes), runs(torch.bincount(frame).tolist())


class PatchEmbed(nn.Module):
    def __init__(self, vc):
        super().__init__()
        k = (vc.temporal_patch_size, vc.patch_size, vc.patch_size)
        self.proj = nn.Conv3d(vc.in_channels, vc.hidden_size, kernel_size=k, stride=k, bias=False)

    def forward(self, x):
        # x: (N, C*T*P*P), each row one patch flattened as (C, T, P, P). A Conv3d whose stride is
        # its kernel is a matmul of each flattened patch with the flattened kernel.
        w = self.proj.weight
        return F.linear(x.to(w.dtype), w.reshape(w.shape[0], -1))


class VisionAttention(nn.Module):
    def __init__(self, vc):
        super().__init__()
        self.n_head = vc.num_heads
        self.qkv = nn.Linear(vc.hidden_size, 3 * vc.hidden_size, bias=True)
        self.proj = nn.Linear(vc.hidden_size, vc.hidden_size, bias=True)

    def forward(self, x, cos, sin, segs):
        N, C = x.shape
        H, D = self.n_head, C // self.n_head
        q, k, v = self.qkv(x).view(N, 3, H, D).unbind(1)  # (N, H, D), patches in window order
        dtype = q.dtype
        q = apply_rope(q.float(), cos, sin).to(dtype)
        k = apply_rope(k.float(), cos, sin).to(dtype)
        # each segment is (end - start) / n groups (windows or frames) of n patches: one batched
        # attention call per segment, (groups, H, n, D), and no patch sees outside its group
        ys = []
        for s, e, n in segs:
            qs, ks, vs = (t[s:e].view(-1, n, H, D).transpose(1, 2) for t in (q, k, v))
            ys.append(F.scaled_dot_product_attention(qs, ks, vs).transpose(1, 2).reshape(e - s, C))
        return self.proj(torch.cat(ys) if len(ys) > 1 else ys[0])


class VisionBlock(nn.Module):
    def __init__(self, vc):
        super().__init__()
        self.norm1 = RMSNorm(vc.hidden_size, 1e-6)
        self.norm2 = RMSNorm(vc.hidden_size, 1e-6)
        self.attn = VisionAttention(vc)
        self.mlp = MLP(vc.hidden_size, vc.intermediate_size, bias=True)

    def forward(self, x, cos, sin, segs):
        x = x + self.attn(self.norm1(x), cos, sin, segs)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """RMSNorm, then each 2x2 group of neighbouring patches (consecutive rows) -> one LM token."""

    def __init__(self, vc):
        super().__init__()
        dim = vc.hidden_size * vc.spatial_merge_size ** 2
        self.ln_q = RMSNorm(vc.hidden_size, 1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, vc.out_hidden_size))

    def forward(self, x):
        return self.mlp(self.ln_q(x).view(-1, self.mlp[0].in_features))


class VisionTransformer(nn.Module):
    def __init__(self, vc):
        super().__init__()
        self.config = vc
        self.patch_embed = PatchEmbed(vc)
        self.blocks = nn.ModuleList([VisionBlock(vc) for _ in range(vc.depth)])
        self.merger = PatchMerger(vc)

    def rope(self, hpos, wpos, device):
        # 2D rotary: a quarter of the head dim's frequencies rotate by row, a quarter by column,
        # then the (h, w) angles are repeated to cover the rotate_half pairs
        D = self.config.hidden_size // self.config.num_heads
        inv_freq = 1.0 / 10000 ** (torch.arange(0, D // 2, 2, dtype=torch.float, device=device) / (D // 2))
        ang = torch.cat([hpos[:, None] * inv_freq, wpos[:, None] * inv_freq], dim=-1)  # (N, D/2)
        ang = torch.cat([ang, ang], dim=-1)[:, None, :]                                # (N, 1, D)
        return ang.cos(), ang.sin()

    def forward(self, pixel_values, grid_thw):
        """pixel_values (N, 3*2*14*14), grid_thw (n_images, 3) -> (N / 4, out_hidden_size)"""
        vc = self.config
        dev = pixel_values.device
        x = self.patch_embed(pixel_values)
        window = vc.window_size // vc.patch_size // vc.spatial_merge_size
        hpos, wpos, frame, win = vision_layout(grid_thw.cpu(), vc.spatial_merge_size, window)
        # the blocks run in window order (see attention_groups); the rows are permuted once here
        # and the merged tokens once at the end, not around every block
        order, win_segs, full_segs = attention_groups(frame, win)
        cos, sin = self.rope(hpos[order].float().to(dev), wpos[order].float().to(dev), dev)
        order = order.to(dev)
        x = x[order]
        for i, blk in enumerate(self.blocks):
            x = blk(x, cos, sin, full_segs if i in vc.fullatt_block_indexes else win_segs)
        x = self.merger(x)                                   # (N / unit, out_hidden_size)
        unit = vc.spatial_merge_size ** 2                    # a merge unit's patches stay together
        out = torch.empty_like(x)
        out[order[::unit] // unit] = x                       # back to the processor's order
        return out

# -----------------------------------------------------------------------------
# Language model: Qwen2 decoder with GQA, q/k/v biases, M-RoPE, and a preallocated KV cache


class KVCache:
    """Preallocated K/V, one (B, H_kv, S, D) buffer per layer for k and for v, written in place.

    All rows write the same slot at each step (prompts are left-padded to a common length);
    `valid` (B, S) marks which slots hold real tokens of that row, `len` is the slots used.
    Positions are not stored: K is rotated before it is written, and each row's next M-RoPE
    position lives with the caller (the sampler). The buffers are allocated at the first write,
    in the dtype of the keys (under mixed precision: the compute dtype, not the weights').
    One buffer per layer, not one (L, ...) tensor: autograd can then run through the cache
    (grpo.py fills it with grad), since a layer's write never touches a tensor that an earlier
    layer saved for backward."""

    def __init__(self, cfg, batch_size, max_len, device=None):
        self.shape = (batch_size, cfg.num_key_value_heads, max_len, cfg.head_dim)  # one layer's
        self.k = [None] * cfg.num_hidden_layers
        self.v = [None] * cfg.num_hidden_layers
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.len = 0

    @property
    def max_len(self):
        return self.shape[2]

    def write(self, layer, k, v, slot=None):
        """Store k, v (B, H_kv, T, D) at slots [len, len + T); return all slots so far. With slot
        (a (1,) long tensor, T = 1): store at that slot and return every slot, written or not (a
        decode step's shapes then never change; the valid mask hides the slots not written)."""
        if self.k[layer] is None:
            self.k[layer] = torch.zeros(self.shape, dtype=k.dtype, device=k.device)
            self.v[layer] = torch.zeros(self.shape, dtype=v.dtype, device=v.device)
        if slot is not None:
            self.k[layer][:, :, slot] = k  # index_put_: compiled, it writes the slot in place
            self.v[layer][:, :, slot] = v
            return self.k[layer], self.v[layer]
        s, T = self.len, k.shape[2]
        self.k[layer][:, :, s:s + T] = k
        self.v[layer][:, :, s:s + T] = v
        return self.k[layer][:, :, :s + T], self.v[layer][:, :, :s + T]

    def at(self, start):
        """This cache as a forward found it, before writing slots [start, ...): the same buffers,
        len = start. A decoder layer recomputed in backward (activation checkpointing) writes its
        K/V through it into the slots it wrote the first time, with the same values."""
        view = KVCache.__new__(KVCache)
        view.shape, view.k, view.v, view.valid, view.len = self.shape, self.k, self.v, self.valid, start
        return view

    def keep_rows(self, index):
        """In place: row i becomes row index[i] (the sampler drops rows that have stopped). One
        layer's buffers are replaced at a time, so a copy of one layer is all the extra memory
        (select_rows would hold the old cache and the new one whole at once)."""
        for layer in range(len(self.k)):
            if self.k[layer] is not None:
                self.k[layer], self.v[layer] = self.k[layer][index], self.v[layer][index]
        self.valid, self.shape = self.valid[index], (len(index), *self.shape[1:])
        return self

    def select_rows(self, index):
        """A new cache whose row i is row index[i] of this one (e.g. each prompt copied G times).
        Under autograd the copies' gradients add up into the source rows."""
        new = KVCache.__new__(KVCache)
        new.shape = (len(index), *self.shape[1:])
        new.k = [k[index] if k is not None else None for k in self.k]
        new.v = [v[index] if v is not None else None for v in self.v]
        new.valid, new.len = self.valid[index], self.len
        return new


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        C = cfg.hidden_size
        self.q_proj = nn.Linear(C, self.n_head * self.head_dim, bias=True)
        self.k_proj = nn.Linear(C, self.n_kv_head * self.head_dim, bias=True)
        self.v_proj = nn.Linear(C, self.n_kv_head * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, C, bias=False)

    def forward(self, x, cos, sin, mask, cache=None, layer=0, slot=None):
        B, T, C = x.shape
        H, Hkv, D = self.n_head, self.n_kv_head, self.head_dim
        q = self.q_proj(x).view(B, T, H, D).transpose(1, 2)     # (B, H, T, D)
        k = self.k_proj(x).view(B, T, Hkv, D).transpose(1, 2)   # (B, Hkv, T, D)
        v = self.v_proj(x).view(B, T, Hkv, D).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:  # write this step's K/V in place, attend over all slots so far
            k, v = cache.write(layer, k, v, slot)
        # GQA: the G = H / Hkv query heads sharing one K/V head are folded into the query length,
        # (B, H, T, D) -> (B, Hkv, G*T, D), so K/V are used as they are, never repeated
        G = H // Hkv
        q = q.reshape(B, Hkv, G * T, D)
        if G > 1 and T > 1:  # a decode step's (B, 1, 1, S) mask broadcasts over the G rows as it is
            mask = mask.expand(B, G, T, mask.shape[-1]).reshape(B, 1, G * T, -1)
        if slot is not None:  # a decode step reads the slots its mask covers
            k, v = k[:, :, :mask.shape[-1]], v[:, :, :mask.shape[-1]]
        if slot is not None and torch.compiler.is_compiling():
            # compiled, a decode step's attention is two batched products (B*Hkv of G x D by D x S)
            # with the scale, mask and softmax fused between them: the fused attention kernel is
            # made for long queries (the demo's step, 128 rows: 3.2 ms this way, 3.6 ms through it)
            S = mask.shape[-1]
            w = torch.baddbmm(mask.expand(B, Hkv, G, S).reshape(B * Hkv, G, S), q.reshape(B * Hkv, G, D),
                              k.reshape(B * Hkv, S, D).transpose(1, 2), alpha=D ** -0.5)  # (B*Hkv, G, S)
            y = torch.bmm(w.softmax(-1), v.reshape(B * Hkv, S, D)).view(B, Hkv, G, D)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, Hkv, G*T, D)
        return self.o_proj(y.reshape(B, H, T, D).transpose(1, 2).reshape(B, T, H * D))


class DecoderLayer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, bias=False)

    def forward(self, x, cos, sin, mask, cache=None, layer=0, slot=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer, slot)
        return x + self.mlp(self.post_attention_layernorm(x))


class TextModel(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.gradient_checkpointing = False

    def rope(self, position_ids, dtype):
        """M-RoPE. position_ids (3, B, T) for the t, h, w axes -> cos, sin (B, 1, T, D).
        The D/2 rotary frequencies are split by mrope_section, e.g. [16, 24, 24]: the first 16
        turn with the t position, the next 24 with h, the last 24 with w. For text tokens the
        three positions are equal, which makes it ordinary 1D RoPE (and text-only qwen2 is that)."""
        cfg = self.config
        D = cfg.head_dim
        inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, D, 2, dtype=torch.float, device=position_ids.device) / D)
        ang = position_ids[..., None].float() * inv_freq                  # (3, B, T, D/2)
        section = cfg.mrope_section or [D // 2]
        ang = torch.cat([a[i % 3] for i, a in enumerate(ang.split(section, dim=-1))], dim=-1)
        ang = torch.cat([ang, ang], dim=-1)[:, None]                      # (B, 1, T, D)
        return ang.cos().to(dtype), ang.sin().to(dtype)

    def forward(self, x, position_ids, attention_mask=None, cache=None):
        B, T, _ = x.shape
        dev = x.device
        valid = attention_mask.bool() if attention_mask is not None else torch.ones(B, T, dtype=torch.bool, device=dev)
        # mask (B, 1, T, S): query i may see key slot j if j is a real token of its row and j is
        # not in its future. A padding query sees itself, so no softmax row is empty (no NaN).
        start = cache.len if cache is not None else 0
        if cache is not None:
            if start + T > cache.max_len:
                raise ValueError(f"KV cache overflow: {start} + {T} tokens > max_len {cache.max_len}")
            cache.valid[:, start:start + T] = valid
            keys = cache.valid[:, :start + T]
        else:
            keys = valid
        qpos = torch.arange(start, start + T, device=dev)[:, None]
        kpos = torch.arange(start + T, device=dev)[None, :]
        mask = ((kpos <= qpos) & keys[:, None, :]) | (kpos == qpos)
        mask = mask[:, None]
        cos, sin = self.rope(position_ids, x.dtype)
        for i, layer in enumerate(self.layers):
            # only the layer's input is kept; backward runs it again. With a cache (GRPO's update
            # pass), the rerun writes the same K/V into the same slots: cache.at(start)
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                rerun = cache.at(start) if cache is not None else None
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, mask, rerun, i, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, cache, i)
        if cache is not None:
            cache.len += T
        return self.norm(x)


def rope_index(input_ids, image_grid_thw, attention_mask, image_token_id, merge):
    """M-RoPE position ids (3, B, T) and each row's next free position (B,).

    Text tokens get (p, p, p) with p counting up. An image of g_h x g_w merged tokens placed when
    the count is at p gets (p, p + row, p + col), and the text after it continues at
    p + max(g_h, g_w). So positions run ahead of / behind the sequence index, differently per row.
    Padding (attention_mask 0) is skipped: every row's first real token is at position 0."""
    B, T = input_ids.shape
    pos = torch.zeros(3, B, T, dtype=torch.long, device=input_ids.device)
    next_pos = torch.zeros(B, dtype=torch.long, device=input_ids.device)
    grids = image_grid_thw.tolist() if image_grid_thw is not None else []
    n_img = 0
    for b in range(B):
        idx = attention_mask[b].nonzero().squeeze(1) if attention_mask is not None else torch.arange(T, device=input_ids.device)
        ids = input_ids[b, idx]
        img_at = (ids == image_token_id).nonzero().squeeze(1).tolist()
        parts, p, i, k = [], 0, 0, 0  # i: index into ids, k: index into img_at
        while k < len(img_at):
            start = img_at[k]
            if start > i:  # text before the image
                parts.append(torch.arange(start - i).expand(3, -1) + p)
                p += start - i
            if n_img >= len(grids):
                raise ValueError(f"row {b}: more images in input_ids than rows in image_grid_thw ({len(grids)})")
            t, h, w = grids[n_img]
            h, w = h // merge, w // merge
            n = t * h * w
            if img_at[k:k + n] != list(range(start, start + n)):
                raise ValueError(f"row {b}: image {n_img} needs {n} consecutive image tokens")
            tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
            parts.append(torch.stack([tt, hh, ww]).reshape(3, -1) + p)
            p += max(h, w)
            i, k, n_img = start + n, k + n, n_img + 1
        if i < len(ids):
            parts.append(torch.arange(len(ids) - i).expand(3, -1) + p)
        if parts:
            row = torch.cat(parts, dim=1).to(input_ids.device)
            pos[:, b, idx] = row
            next_pos[b] = row.max() + 1
    if n_img != len(grids):
        raise ValueError(f"image tokens for {n_img} images but image_grid_thw has {len(grids)} rows")
    return pos, next_pos

# -----------------------------------------------------------------------------
# The whole model


class Qwen2_5_VL(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        if cfg.vision is not None:
            self.visual = VisionTransformer(cfg.vision)
        self.model = TextModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self):
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def rope_index(self, input_ids, image_grid_thw=None, attention_mask=None):
        merge = self.config.vision.spatial_merge_size if self.config.vision else 2
        return rope_index(input_ids, image_grid_thw, attention_mask, self.config.image_token_id, merge)

    def embed(self, input_ids, pixel_values=None, image_grid_thw=None):
        """Token embeddings with each <|image_pad|> replaced by its merged vision token."""
        x = self.model.embed_tokens(input_ids)
        if pixel_values is not None:
            img = self.visual(pixel_values, image_grid_thw).to(x.dtype)
            is_img = input_ids == self.config.image_token_id
            if int(is_img.sum()) != img.shape[0]:
                raise ValueError(f"image features and image tokens do not match: "
                                 f"{int(is_img.sum())} <|image_pad|> tokens, {img.shape[0]} image features")
            x = x.masked_scatter(is_img[..., None], img)
        return x

    def forward(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
                position_ids=None, cache=None, logits=True):
        """input_ids (B, T) -> logits (B, T, vocab); with logits="last" only the last position's
        (B, 1, vocab); with a (B, T) bool mask only those positions' (N, vocab), which keeps the
        (B, T, vocab) tensor out of memory in training; with logits=False the hidden states (B, T, C);
        with a function, fn(hidden states, self.lm_head), called inside the forward (where a sharded
        model's head weights are gathered: GRPO makes its logits a chunk at a time from them).
        With a cache, input_ids are the new tokens and position_ids (3, B, T) their
        positions (the sampler knows each row's); without, positions come from rope_index."""
        x = self.embed(input_ids, pixel_values, image_grid_thw)
        if position_ids is None:
            if cache is not None and cache.len > 0:
                raise ValueError("decoding with a cache needs explicit position_ids")
            position_ids, _ = self.rope_index(input_ids, image_grid_thw, attention_mask)
        h = self.model(x, position_ids, attention_mask, cache)
        if isinstance(logits, torch.Tensor):  # a (B, T) bool mask: logits of those positions only, (N, vocab)
            return self.lm_head(h[logits])
        if callable(logits):
            return logits(h, self.lm_head)
        if logits == "last":
            h = h[:, -1:]
        return self.lm_head(h) if logits else h

    def decode(self, tok, pos, slot, cache, n_slots=None):
        """One decode step: tok (B,) long, each row's new token; pos (B,) long, its position (a
        text token's t, h and w positions are equal); slot (1,) long, the cache slot every row
        writes. Attention reads the first n_slots slots of the cache (default: all), the ones
        not written hidden by its valid mask, so the shapes stay the same from step to step.
        -> logits (B, vocab)"""
        B = tok.shape[0]
        x = self.model.embed_tokens(tok)[:, None]                                 # (B, 1, C)
        cos, sin = self.model.rope(pos.view(1, B, 1).expand(3, B, 1), x.dtype)   # (B, 1, 1, D)
        cache.valid[:, slot] = True
        valid = cache.valid[:, :n_slots or cache.max_len]
        # one additive mask for every layer: 0 where a slot holds a token of the row, -inf elsewhere
        mask = torch.zeros(valid.shape, dtype=x.dtype, device=x.device).masked_fill_(~valid, float("-inf"))
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, mask[:, None, None], cache, i, slot)            # mask (B, 1, 1, S)
        return self.lm_head(self.model.norm(x))[:, 0]

    def new_cache(self, batch_size, max_len, device=None):
        return KVCache(self.config, batch_size, max_len, device or self.model.embed_tokens.weight.device)

    @torch.no_grad()
    def init_weights(self, std=0.02, seed=0):
        """Random init for models trained from scratch (tiny demo): normal(0, std) matrices, zero
        biases, unit norms. Deterministic given the seed."""
        g = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif p.dim() == 1:
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * std)
        return self

# -----------------------------------------------------------------------------
# Checkpoints: HF layout (config.json + model.safetensors or shards + index.json)

SAFETENSORS_INDEX = "model.safetensors.index.json"


def checkpoint_key(name):
    """Map a key as written by any transformers version to ours (= the official checkpoints').
    transformers >= 4.52 saves `model.language_model.*` and `model.visual.*`."""
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model."):]
    if name.startswith("model.visual."):
        return name[len("model."):]
    return name


def checkpoint_files(path):
    index = os.path.join(path, SAFETENSORS_INDEX)
    if os.path.isfile(index):
        with open(index) as f:
            return sorted({os.path.join(path, v) for v in json.load(f)["weight_map"].values()})
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    raise FileNotFoundError(f"{path}: neither model.safetensors nor {SAFETENSORS_INDEX}")


def load_model(path, dtype=torch.float32, device="cpu"):
    """Build the model on the meta device (no memory), then stream each tensor from safetensors
    straight into `dtype` on `device`: the weights are in memory once. Strict: every missing or
    unexpected key and every shape mismatch is an error that names it."""
    from safetensors import safe_open
    cfg = load_config(path)
    with torch.device("meta"):
        model = Qwen2_5_VL(cfg)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        expected.pop("lm_head.weight")
    sd, unexpected = {}, []
    for file in checkpoint_files(path):
        with safe_open(file, framework="pt", device=str(device)) as f:
            for name in f.keys():
                key = checkpoint_key(name)
                if key == "lm_head.weight" and cfg.tie_word_embeddings:
                    continue  # some tied checkpoints store the head anyway; it is the embedding
                if key not in expected:
                    unexpected.append(f"{name} (in {os.path.basename(file)})")
                    continue
                t = f.get_tensor(name)
                if t.shape != expected[key]:
                    raise ValueError(f"{file}: shape mismatch for {name}: checkpoint {tuple(t.shape)}, "
                                     f"model {tuple(expected[key])}")
                sd[key] = t.to(dtype)
    missing = sorted(set(expected) - set(sd))
    if missing or unexpected:
        raise KeyError(f"{path}: checkpoint does not match the config. "
                       f"missing keys: {missing[:20]}{' ...' if len(missing) > 20 else ''}; "
                       f"unexpected keys: {unexpected[:20]}{' ...' if len(unexpected) > 20 else ''}")
    if cfg.tie_word_embeddings:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    model.load_state_dict(sd, strict=True, assign=True)
    model.tie_weights()
    return model.to(device)


def save_model(model, path, max_shard_bytes=5 * 2**30, state_dict=None):
    """Write config.json and model.safetensors (or shards + index) in the official layout.
    Pass `state_dict` when the model is sharded (FSDP) and the full one was gathered elsewhere."""
    from safetensors.torch import save_file
    cfg = model.config
    sd = state_dict if state_dict is not None else model.state_dict()
    if cfg.tie_word_embeddings:
        sd = {k: v for k, v in sd.items() if k != "lm_head.weight"}  # it is the embedding
    sd = {k: v.detach().contiguous().cpu() for k, v in sd.items()}
    os.makedirs(path, exist_ok=True)
    d = config_to_dict(cfg)
    d["torch_dtype"] = str(next(iter(sd.values())).dtype).replace("torch.", "")
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(d, f, indent=2)
    shards, cur, size = [], {}, 0
    for k, v in sd.items():
        nbytes = v.numel() * v.element_size()
        if cur and size + nbytes > max_shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[k] = v
        size += nbytes
    shards.append(cur)
    if len(shards) == 1:
        save_file(shards[0], os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(path, name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    total = sum(v.numel() * v.element_size() for v in sd.values())
    with open(os.path.join(path, SAFETENSORS_INDEX), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
