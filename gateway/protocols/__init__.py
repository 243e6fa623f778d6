"""One home per wire protocol: request models, translators and encoders, error shapes."""
