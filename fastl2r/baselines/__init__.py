"""The methods the paper compares its meta-learner with (DESIGN §1.6)."""
