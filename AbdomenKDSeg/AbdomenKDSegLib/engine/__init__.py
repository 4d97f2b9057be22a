"""The science: image reading and checks, geometry, pre/post-processing, networks, model bundles, the Predictor."""
