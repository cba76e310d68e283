from vistune.testing import check_reward


def test_keyword_match(plugin_manager):
    spec = plugin_manager.registries.rewards.get("keyword-match")
    scores = check_reward(
        spec,
        ["What is in the picture?"] * 4,
        ["A red square.", "a circle, red", "blue", "anything"],
        {"answer": ["a red circle", "a red circle", "a red circle", None]},
    )
    assert scores == [0.5, 1.0, 0.0, None]


def test_column_option(plugin_manager):
    spec = plugin_manager.registries.rewards.get("keyword-match")
    scores = check_reward(spec, ["?"], ["green cross"], {"caption": ["a green cross"]}, options={"column": "caption"})
    assert scores == [1.0]
    assert check_reward(spec, ["?"], ["green cross"], {"caption": ["a green cross"]}) == [None]


def test_registration_is_clean(plugin_manager):
    info = plugin_manager.infos["caption-reward"]
    assert info.errors == [] and info.registered == {"rewards": ["keyword-match"]}
