"""The embedded multimodal data (trainer/data/multimodal.py): vocabulary ranges, packing,
layout-independent batches, and the Transfusion inputs."""

from __future__ import annotations

from types import SimpleNamespace as NS

import pytest
import torch

from models.diffusion import add_noise, cosine_alphas_cumprod
from trainer.data import MultimodalData, TrainData, build_data
from trainer.data.multimodal import NUMBER_WORDS, build_multimodal
from trainer.errors import ConfigError


def _data(setting="chameleon", modalities=("text", "image"), seq_len=128, gbs=8):
    cfg = NS(name="t", setting=setting, modalities=list(modalities), caption_first=0.8,
             valid_fraction=0.1)
    model = NS(vocab_size=256, diffusion=NS(num_timesteps=1000, patch_dim=4))
    return build_multimodal(cfg, seq_len=seq_len, seed=3, global_batch_size=gbs,
                            model_cfg=model)


def test_chameleon_documents_use_disjoint_ranges_and_restart_positions():
    d = _data(modalities=("text", "image", "speech"))
    v = d.docs.vocab
    b = d.train_microbatches(0, 8, 0, 1)[0]
    tok, mod = b["tokens"], b["modality_ids"]
    assert ((tok >= v.speech_start) == (mod == 2)).all()
    assert (((tok >= v.image_start) & (tok < v.speech_start)) == (mod == 1)).all()
    assert torch.equal(b["loss_modality"][:, :-1], mod[:, 1:])
    # every image is exactly 64 pixel tokens between BOI and EOI
    for row in tok.tolist():
        for i, t in enumerate(row):
            if t == v.ids["<boi>"] and i + 65 < len(row):
                assert all(v.image_start <= x < v.speech_start for x in row[i + 1:i + 65])
                assert row[i + 65] == v.ids["<eoi>"]
    # positions restart at each document; documents are packed whole
    doc, pos = b["doc_ids"], b["position_ids"]
    starts = torch.cat([torch.ones_like(doc[:, :1], dtype=torch.bool), doc[:, 1:] != doc[:, :-1]], 1)
    assert (pos[starts] == 0).all() and (pos[~starts] > 0).all()


def test_batches_do_not_depend_on_the_data_parallel_layout():
    d = _data(gbs=8)
    whole = d.train_microbatches(40, 8, 0, 1)[0]
    parts = [mb for r in range(2) for mb in d.train_microbatches(40, 2, r, 2)]
    order = [0, 2, 1, 3]  # micro-batch i of rank r holds samples (i*dp + r)*mbs .. +mbs
    for key, value in whole.items():
        got = torch.cat([parts[i][key] for i in order])
        assert torch.equal(got, value), key
    # and a rebuilt object with the same seed serves the same samples (resume)
    again = _data(gbs=8).train_microbatches(40, 8, 0, 1)[0]
    assert all(torch.equal(again[k], whole[k]) for k in whole)


def test_caption_order_mix_and_validation_split():
    d = _data()
    boi = d.docs.vocab.ids["<boi>"]
    first = [d.docs.document(i, 0)["tokens"][0] != boi for i in range(400)]
    assert 0.72 < sum(first) / len(first) < 0.88  # caption-first ~80%
    assert not set(d.valid_ids) & set(d.train_ids)
    assert len(d.valid_ids) == round(0.1 * len(d.docs.labels))


def test_transfusion_inputs_are_noised_patches_in_bidirectional_blocks():
    d = _data("transfusion", seq_len=64)
    b = d.train_microbatches(0, 8, 0, 1)[0]
    is_patch = b["timesteps"] >= 0
    assert ((b["block_ids"] > 0) == is_patch).all()
    assert (b["modality_ids"][is_patch] == 1).all()
    assert (b["loss_mask"][is_patch] == 0).all()  # no LM loss on image positions
    # each image: 16 patches, one t, x_t = sqrt(ab) x0 + sqrt(1 - ab) eps
    ac = cosine_alphas_cumprod(1000)
    doc = d.docs.document(int(d._packing("train", 0)[0][0]), 0)
    xt = add_noise(torch.from_numpy(doc["x0"]), torch.from_numpy(doc["noise"]),
                   torch.tensor(doc["t"]), ac)
    sel = is_patch[0] & (b["doc_ids"][0] == 0)
    assert sel.sum() == 16 and (b["timesteps"][0][sel] == doc["t"]).all()
    torch.testing.assert_close(b["patches"][0][sel], xt)
    torch.testing.assert_close(b["noise"][0][sel], torch.from_numpy(doc["noise"]))
    assert doc["x0"].min() >= -1 and doc["x0"].max() <= 1


def test_captions_name_the_digit_and_short_sequences_are_refused():
    d = _data()
    v = {i: w for w, i in d.docs.vocab.ids.items()}
    doc = d.docs.document(5, 0)
    words = [v[t] for t in doc["tokens"].tolist() if t in v]
    assert NUMBER_WORDS[int(d.docs.labels[5])] in words
    with pytest.raises(ConfigError, match="trainer.seq_len=32 is shorter"):
        _data(seq_len=32)


def test_build_data_builds_multimodal_by_source():
    ref = _data()
    cfg = NS(source="multimodal", name="t", setting="chameleon", modalities=["text", "image"],
             caption_first=0.8, valid_fraction=0.1)
    model = NS(vocab_size=256, diffusion=NS(num_timesteps=1000, patch_dim=4))
    got = build_data(cfg, seq_len=128, seed=3, global_batch_size=8, train_samples=0,
                     valid_samples=0, model_cfg=model)
    assert isinstance(got, MultimodalData) and isinstance(got, TrainData)
    for a, b in zip(ref.train_microbatches(8, 2, 1, 2), got.train_microbatches(8, 2, 1, 2)):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
