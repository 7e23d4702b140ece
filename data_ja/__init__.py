"""Japanese training data for llava-jp: convert, translate, check and mix LLaVA-format sets."""
