"""semiscale training library: models, losses, optimisation, distributed engine and stages' building blocks."""
