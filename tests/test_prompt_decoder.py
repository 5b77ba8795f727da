"""RestorationPromptDecoder: shapes, candidate embeddings, decoding rules, save/load, learnability, metrics."""

from __future__ import annotations

import pytest
import torch

from dalpsr.degradations import vocabulary
from dalpsr.models.degradation_encoder import DegradationEncoder
from dalpsr.models.prompt_decoder import RestorationPromptDecoder, degradation_metrics, prediction_from_probabilities

TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
N = vocabulary.NUM_TYPES * vocabulary.NUM_BINS


pytestmark = pytest.mark.usefixtures("one_thread")


def decoder_with_candidates(seed: int = 0) -> RestorationPromptDecoder:
    torch.manual_seed(seed)
    dec = RestorationPromptDecoder(embed_dim=32, hidden_dim=32, num_layers=2, num_heads=2)
    dec.set_candidate_embeddings(torch.randn(N, 32, generator=torch.Generator().manual_seed(seed)))
    return dec


def test_candidates_from_clip_text_tower_and_decode_from_features():
    enc = DegradationEncoder(clip_model=TINY, num_degradation_tokens=4)
    dec = RestorationPromptDecoder(embed_dim=32, hidden_dim=32, num_heads=2)
    with pytest.raises(ValueError, match="encode_candidates"):
        dec(torch.randn(1, 4, 32))
    dec.encode_candidates(enc)
    expected = enc.encode_text(list(vocabulary.CANDIDATE_PHRASES), normalize=True)
    torch.testing.assert_close(dec.candidate_embeds, expected)
    feats = enc.encode_images(torch.rand(3, 3, 40, 40, generator=torch.Generator().manual_seed(0)))
    pred = dec.decode(feats)
    same = dec.decode(feats.degradation_tokens)
    torch.testing.assert_close(pred.logits, same.logits)
    assert pred.logits.shape == (3, *vocabulary.LABEL_SHAPE)
    for i in range(3):
        torch.testing.assert_close(vocabulary.text_to_labels(pred.prompts[i]), pred.labels[i])
        assert pred.bins[i] == vocabulary.labels_to_bins(pred.labels[i])
    with pytest.raises(ValueError, match="`degradation_tokens`"):
        dec(torch.randn(2, 4, 16))


def test_decoding_rule_threshold_and_argmax():
    probs = torch.zeros(1, *vocabulary.LABEL_SHAPE)
    probs[0, 0] = torch.tensor([0.1, 0.7, 0.6, 0.2])  # blur: bin 1
    probs[0, 1] = torch.tensor([0.1, 0.1, 0.1, 0.05])  # noise: bins sum to 0.35 → none
    probs[0, 2] = torch.tensor([0.05, 0.2, 0.25, 0.1])  # jpeg: no bin reaches 0.5, the sum 0.6 does → bin 2
    pred = prediction_from_probabilities(probs, threshold=0.5)
    assert pred.prompts == ["Deblur with sigma 0.25~0.50, Dejpeg with quality 70~89"]
    assert pred.bins == [{"blur": 1, "noise": None, "jpeg": 2, "downscale": None}]
    assert prediction_from_probabilities(probs, threshold=0.3).bins[0]["noise"] == 0
    assert prediction_from_probabilities(probs, threshold=0.65).bins[0] == {
        "blur": 1,
        "noise": None,
        "jpeg": None,
        "downscale": None,
    }
    report = pred.report(0)
    assert report["types"]["noise"]["text"] == "none" and report["types"]["jpeg"]["bin"] == 2
    dec = decoder_with_candidates()
    with pytest.raises(ValueError, match="`threshold`"):
        dec.decode(torch.randn(1, 4, 32), threshold=1.5)


def test_save_pretrained_round_trip_keeps_candidates(tmp_path):
    dec = decoder_with_candidates(1)
    tokens = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(2))
    dec.save_pretrained(tmp_path / "dec")
    loaded = RestorationPromptDecoder.from_pretrained(tmp_path / "dec")
    assert loaded.config.candidate_phrases == list(vocabulary.CANDIDATE_PHRASES)
    torch.testing.assert_close(loaded.candidate_embeds, dec.candidate_embeds)
    dec.eval()
    torch.testing.assert_close(loaded(tokens), dec(tokens), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="another degradation vocabulary"):
        RestorationPromptDecoder(embed_dim=32, candidate_phrases=["Deblur with sigma 0.00~0.50"])
    with pytest.raises(ValueError, match="`embeds`"):
        dec.set_candidate_embeddings(torch.randn(N - 1, 32))


def test_decoder_learns_labels_from_tokens():
    # each label set is written into the tokens by a fixed random map; the decoder must learn to read it back
    g = torch.Generator().manual_seed(0)
    n = 64
    classes = torch.randint(0, vocabulary.NUM_BINS + 1, (n, vocabulary.NUM_TYPES), generator=g)
    labels = torch.zeros(n, *vocabulary.LABEL_SHAPE)
    for t in range(vocabulary.NUM_TYPES):
        present = classes[:, t] > 0
        labels[present, t, classes[present, t] - 1] = 1.0
    mixing = torch.randn(N, 4 * 32, generator=g)
    tokens = (labels.flatten(1) @ mixing).view(n, 4, 32) + 0.05 * torch.randn(n, 4, 32, generator=g)
    dec = decoder_with_candidates(3)
    opt = torch.optim.AdamW(dec.parameters(), lr=3e-3)
    for _ in range(150):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(dec(tokens), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    metrics = degradation_metrics(dec.decode(tokens).labels, labels)
    assert metrics["mean"]["bin_accuracy"] > 0.95, metrics["mean"]


def test_degradation_metrics_known_values():
    def lab(*bins):
        return (
            vocabulary.values_to_labels({})
            if not bins
            else torch.stack(
                [
                    torch.nn.functional.one_hot(torch.tensor(b), 4).float() if b is not None else torch.zeros(4)
                    for b in bins
                ]
            )
        )

    target = torch.stack([lab(0, None, 2, None), lab(1, 1, None, None), lab(None, 3, 2, None), lab(3, None, 0, None)])
    pred = torch.stack([lab(0, None, 2, None), lab(3, None, None, None), lab(1, 3, 2, None), lab(None, 2, 0, None)])
    m = degradation_metrics(pred, target)
    blur = m["types"]["blur"]
    # blur true: b0, b1, none, b3; predicted: b0, b3, b1, none
    assert blur["detection_accuracy"] == 0.5
    assert blur["detection_precision"] == pytest.approx(2 / 3) and blur["detection_recall"] == pytest.approx(2 / 3)
    assert blur["bin_accuracy"] == 0.25
    assert blur["bin_mae"] == pytest.approx(1.0)  # |0-0| and |3-1| over the two both-present samples
    assert blur["confusion"][1][1] == 1 and blur["confusion"][2][4] == 1 and blur["confusion"][0][2] == 1
    assert blur["confusion"][4][0] == 1 and sum(map(sum, blur["confusion"])) == 4
    noise = m["types"]["noise"]  # true: none, b1, b3, none; predicted: none, none, b3, b2
    assert noise["bin_accuracy"] == 0.5 and noise["majority_class"] == "none"
    assert noise["majority_bin_accuracy"] == 0.5 and noise["bin_mae"] == 0.0
    down = m["types"]["downscale"]
    assert down["detection_accuracy"] == 1.0 and down["detection_f1"] == 0.0 and down["bin_mae"] is None
    with pytest.raises(ValueError, match="labels must be"):
        degradation_metrics(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4))


def test_describe_image_averages_a_grid_of_crops():
    from dalpsr.models.prompt_decoder import describe_image, grid_crops
    from dalpsr.testing import get_dummy_degradation_models

    encoder, decoder = get_dummy_degradation_models()
    g = torch.Generator().manual_seed(0)
    image = torch.rand(3, 80, 100, generator=g)
    crops = grid_crops(image, (32, 32), 16)
    assert crops.shape == (12, 3, 32, 32)  # 3 × 4 grid covers 80 × 100, corners included
    assert torch.equal(crops[0], image[:, :32, :32]) and torch.equal(crops[-1], image[:, -32:, -32:])
    assert grid_crops(image, (32, 32), 4).shape[0] == 4 and grid_crops(image, (32, 32), 1).shape[0] == 1
    assert grid_crops(image[:, :20, :20], (32, 32), 16).shape == (1, 3, 20, 20)
    with pytest.raises(ValueError, match="`max_crops`"):
        grid_crops(image, (32, 32), 0)
    # a 2×2 mosaic of one tile reads like the tile itself, whichever crops are taken
    tile = torch.rand(3, 32, 32, generator=g)
    mosaic = tile.repeat(1, 2, 2)
    one = describe_image(encoder, decoder, tile)
    many = describe_image(encoder, decoder, mosaic, max_crops=4)
    torch.testing.assert_close(many.probabilities, one.probabilities, rtol=0, atol=1e-6)
    # otherwise the probabilities are the mean over the crops
    with torch.no_grad():
        expected = torch.sigmoid(decoder(encoder.encode_images(grid_crops(image, (32, 32), 4)).degradation_tokens))
    pred = describe_image(encoder, decoder, image, max_crops=4)
    torch.testing.assert_close(pred.probabilities, expected.mean(0, keepdim=True), rtol=0, atol=1e-6)
    assert pred.prompts == prediction_from_probabilities(expected.mean(0, keepdim=True)).prompts
