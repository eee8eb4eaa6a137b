from ditkern.zoo import classifier, data


def test_heldout_accuracy_at_least_95_percent():
    assert classifier.heldout_accuracy() >= 0.95


def test_classifies_real_digits_at_pipeline_resolution():
    x, y = data.digits()
    assert classifier.accuracy((x[:200] + 1) / 2, y[:200].tolist()) >= 0.95
