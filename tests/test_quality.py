"""model/quality.py: SWD, the ex-post GMM, FID and KID, attribute files and vectors, active units."""

import json
import pickle

import pytest
import torch

from model import quality
from pipeline.attributes import CELEBA_ATTRIBUTES_FILE, ATTRIBUTES, AttributeFileError, parse_attributes, shard_attributes
from prep.synthetic import ATTRIBUTE_NAMES, make_face_and_attributes

# CelebA's 40 attributes, in the order of its list_attr_celeba.txt.
CELEBA_NAMES = (
    "5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose Black_Hair Blond_Hair "
    "Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee Gray_Hair Heavy_Makeup High_Cheekbones "
    "Male Mouth_Slightly_Open Mustache Narrow_Eyes No_Beard Oval_Face Pale_Skin Pointy_Nose Receding_Hairline "
    "Rosy_Cheeks Sideburns Smiling Straight_Hair Wavy_Hair Wearing_Earrings Wearing_Hat Wearing_Lipstick "
    "Wearing_Necklace Wearing_Necktie Young").split()


def mixture_moments(gmm: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The mixture's mean and covariance: sum_k w_k mu_k and sum_k w_k (S_k + mu_k mu_k^T) - mu mu^T."""
    w, mu, cov = gmm["weights"].double(), gmm["means"].double(), gmm["covariances"].double()
    mean = w @ mu
    second = torch.einsum("k,kij->ij", w, cov + mu[:, :, None] * mu[:, None, :])
    return mean, second - torch.outer(mean, mean)


def smooth_images(n, seed):
    g = torch.Generator().manual_seed(seed)
    return quality._blur(torch.rand(n, 3, 64, 64, generator=g))


# ----------------------------------------------------------------------------- SWD


def test_swd_of_a_set_against_itself_is_zero_and_against_a_shifted_set_larger():
    real, other = smooth_images(40, 0), smooth_images(40, 1)
    out = quality.swd(real, {"self": real, "other": other, "brighter": (other + 0.15).clamp(0, 1),
                             "blurred": quality._blur(other)}, seed=3)
    assert out["self"] == [0.0, 0.0, 0.0]  # 64, 32 and 16 px levels
    assert all(v > 0 for v in out["other"])
    assert out["brighter"][-1] > 5 * out["other"][-1]  # a colour shift shows in the low-pass level
    assert out["blurred"][0] > 5 * out["other"][0]  # lost detail shows in the finest band
    assert quality.swd(real, {"other": other}, seed=3)["other"] == out["other"]  # the seed fixes patches and directions


def test_sliced_w1_is_pots_sliced_wasserstein_distance():
    import ot
    from ot.sliced import get_random_projections

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(300, 12, generator=g), torch.randn(300, 12, generator=g) * 1.3 + 0.2
    projections = torch.as_tensor(get_random_projections(12, 64, seed=1), dtype=torch.float32)
    ours = quality.sliced_w1(quality.sorted_projections(a, projections), b, projections)
    pots = float(ot.sliced_wasserstein_distance(a.double(), b.double(), projections=projections.double(), p=1))
    assert ours == pytest.approx(pots, rel=1e-5)


def test_laplacian_pyramid_adds_back_up_to_the_image():
    x = smooth_images(2, 4)
    levels = quality.laplacian_pyramid(x)
    assert [level.shape[-1] for level in levels] == [64, 32, 16]
    rebuilt = levels[-1]
    for band in reversed(levels[:-1]):
        rebuilt = band + quality.pyr_up(rebuilt)
    assert torch.allclose(rebuilt, x, atol=1e-5)


# ----------------------------------------------------------------------------- GMM


@pytest.fixture(scope="module")
def gmm_file(tmp_path_factory):
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0, 0, 0], [4, 0, -2, 1], [-3, 3, 1, 0]])
    codes = torch.cat([c + torch.randn(400, 4, generator=g) @ torch.diag(torch.tensor([1.0, 0.5, 2, 0.3]))
                       for c in centres])
    path = tmp_path_factory.mktemp("gmm") / "w.gmm.pt"
    quality.save_tensors(path, quality.fit_gmm(codes, components=3, seed=0))
    return path


def test_the_saved_gmm_loads_with_weights_only(gmm_file):
    state = torch.load(gmm_file, weights_only=True)
    assert state["means"].shape == (3, 4) and state["covariances"].shape == (3, 4, 4)
    assert float(state["weights"].sum()) == pytest.approx(1)


def test_gmm_samples_have_the_mixtures_mean_and_covariance(gmm_file):
    gmm = quality.load_gmm(gmm_file)
    n = 40_000
    z = quality.draw_latents(n, 4, torch.Generator().manual_seed(1), gmm=gmm).double()
    mean, cov = mixture_moments(gmm)
    sd = cov.diagonal().sqrt()
    assert ((z.mean(0) - mean).abs() < 4 * sd / n ** 0.5).all()  # 4 standard errors
    # The sample covariance's standard error is about sqrt((S_ii S_jj + S_ij^2) / n); 5 of them, for heavy tails.
    bound = 5 * ((torch.outer(cov.diagonal(), cov.diagonal()) + cov ** 2) / n).sqrt()
    assert ((torch.cov(z.T) - cov).abs() < bound).all()


def test_temperature_scales_each_components_spread(gmm_file):
    gmm = quality.load_gmm(gmm_file)
    flat = quality.draw_latents(50, 4, torch.Generator().manual_seed(2), 0.0, gmm=gmm).double()
    assert all(any(torch.allclose(z, m) for m in gmm["means"]) for z in flat)  # T = 0: the component means


def test_a_gmm_file_that_would_run_code_is_refused_and_runs_nothing(tmp_path):
    planted = tmp_path / "PWNED"

    class Exploit:
        def __reduce__(self):
            return (open, (str(planted), "w"))

    bad = tmp_path / "vae_celeba.gmm.pt"
    bad.write_bytes(pickle.dumps({"weights": Exploit()}))
    with pytest.raises(quality.QualityError, match="not a file of plain tensors"):
        quality.load_gmm(bad)
    assert not planted.exists()
    torch.save({"weights": torch.ones(2), "means": torch.zeros(3, 4), "covariances": torch.zeros(3, 4, 4)}, bad)
    with pytest.raises(quality.QualityError, match="do not fit together"):
        quality.load_gmm(bad)


# ----------------------------------------------------------------------------- attributes


def test_the_synthetic_attribute_file_parses_like_celebas(faces_dir):
    text = (faces_dir.parent / CELEBA_ATTRIBUTES_FILE).read_text()
    names, table = parse_attributes(text, "synthetic")
    assert names == [n for n in CELEBA_NAMES if n in names] and set(names) == set(ATTRIBUTE_NAMES)
    assert sorted(table) == sorted(p.name for p in faces_dir.glob("*.jpg"))
    lines = text.splitlines()
    assert lines[0] == str(len(table)) and lines[1].split() == names
    assert all(len(line.split()) == len(names) + 1 for line in lines[2:])
    assert table["000007.jpg"] == make_face_and_attributes(0, 7)[1]  # what the face was drawn with
    columns = list(zip(*table.values()))
    assert all(1 in column and -1 in column for column in columns[names.index("Smiling"):][:1])
    for hair in ("Black_Hair", "Brown_Hair", "Blond_Hair", "Gray_Hair"):  # one colour, or Bald
        assert hair in names
    hair = [names.index(n) for n in ("Bald", "Black_Hair", "Brown_Hair", "Blond_Hair", "Gray_Hair")]
    assert all(sum(v[i] == 1 for i in hair) == 1 for v in table.values())


def test_the_shards_carry_the_attributes_in_a_side_file_the_manifest_lists(shards, faces_dir):
    manifest = json.loads((shards / "manifest.json").read_text())
    assert manifest["attributes"]["file"] == ATTRIBUTES and (shards / ATTRIBUTES).is_file()
    names, by_key = shard_attributes(shards, manifest)
    _, by_file = parse_attributes((faces_dir.parent / CELEBA_ATTRIBUTES_FILE).read_text(), "synthetic")
    assert by_key == {name[:-4]: values for name, values in by_file.items()}  # keyed by sample key
    for entry in ("../attributes.txt", "/etc/passwd", "pipe:cat attributes.txt"):
        with pytest.raises(AttributeFileError, match="not a plain file name"):
            shard_attributes(shards, {"attributes": {"file": entry}})


@pytest.mark.parametrize("text, where", [
    ("2\nSmiling\n1.jpg 1\n", "counts 2 images"),
    ("1\nSmiling Male\n1.jpg 1 0\n", "line 3"),
    ("x\n", "CelebA's attribute format"),
    ("1\nSmiling Smiling\n1.jpg 1 1\n", "line 2"),
])
def test_a_bad_attribute_file_is_one_line_naming_the_place(text, where):
    with pytest.raises(AttributeFileError) as exc:
        parse_attributes(text, "list_attr_celeba.txt")
    assert where in str(exc.value) and "\n" not in str(exc.value)


def test_attribute_vectors_are_differences_of_means():
    codes = torch.tensor([[1.0, 0], [3, 0], [0, 2], [0, 4]])
    values = torch.tensor([[1, 1], [1, 1], [-1, 1], [-1, 1]], dtype=torch.int8)
    out = quality.attribute_vectors(codes, values, ["A", "All"])
    assert out["names"] == ["A"]  # "All" has no negatives: no vector
    assert torch.equal(out["vectors"], torch.tensor([[2.0, -3]]))


# ----------------------------------------------------------------------------- active units


def test_active_units_count_dimensions_whose_mean_varies():
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(500, 4, generator=g) * torch.tensor([1.0, 0.5, 0.05, 0.0])  # variances 1, 0.25, 0.0025, 0
    assert quality.active_units(mu) == 2
    logvar = torch.zeros(500, 4)  # unit variance: the KL count sees only the means' spread too
    assert quality.active_dims_kl(mu, logvar) == 2
