"""The preference record formats: names, identifying fields and examples (no heavy imports: the plugin reads them)."""

#: The column of a sample that holds its answers.
ANSWERS = "preference"
#: Format name -> the fields that identify it (looked for in this order: unpaired first).
LAYOUTS = {
    "trl-kto": ("prompt", "completion", "label"),
    "ms-swift-kto": ("messages", "label"),
    "trl-preference": ("prompt", "chosen", "rejected"),
    "ms-swift-preference": ("messages", "rejected_response"),
}
PAIRED = ("trl-preference", "ms-swift-preference")
#: One record of each, as TRL's and ms-swift's documentation write them.
EXAMPLES = {
    "trl-preference": {"prompt": [{"role": "user", "content": "What colour is the shape?"}],
                       "chosen": [{"role": "assistant", "content": "Red."}],
                       "rejected": [{"role": "assistant", "content": "Blue."}],
                       "images": ["images/0001.png"]},
    "ms-swift-preference": {"messages": [{"role": "user", "content": "<image>What colour is the shape?"},
                                         {"role": "assistant", "content": "Red."}],
                            "rejected_response": "Blue.", "images": ["images/0001.png"]},
    "trl-kto": {"prompt": [{"role": "user", "content": "What colour is the shape?"}],
                "completion": [{"role": "assistant", "content": "Red."}], "label": True,
                "images": ["images/0001.png"]},
    "ms-swift-kto": {"messages": [{"role": "user", "content": "<image>What colour is the shape?"},
                                  {"role": "assistant", "content": "Blue."}],
                     "label": False, "images": ["images/0001.png"]},
}  # fmt: skip
