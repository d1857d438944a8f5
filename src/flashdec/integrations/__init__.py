"""flashdec inside other libraries' models: :mod:`flashdec.integrations.transformers`."""
