"""The digits classification run learns (a short run; the full demo reaches >= 97%)."""

from axial_deeplab.commands.classify_demo import load_digits_split, train_digits


def test_digits_split_is_fixed_and_disjoint():
    a = load_digits_split(seed=0)
    b = load_digits_split(seed=0)
    assert all((x == y).all() for x, y in zip(a, b))
    x_tr, y_tr, x_te, y_te = a
    assert x_tr.shape[1:] == (3, 32, 32) and len(y_tr) + len(y_te) == 1797 and len(y_te) == 359
    # no test image appears in the training set
    flat_tr = {tuple(v.tolist()) for v in x_tr[:, 0, ::4, ::4].reshape(len(y_tr), -1)}
    assert sum(tuple(v.tolist()) in flat_tr for v in x_te[:, 0, ::4, ::4].reshape(len(y_te), -1)) < 5


def test_short_run_learns_far_above_chance():
    _, r = train_digits(epochs=3, progress=False, image_size=16)
    assert r["top1"] > 0.5  # chance is 0.1
    assert r["n_test"] == 359
