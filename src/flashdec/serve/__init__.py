"""flashdec's OpenAI-compatible server: model loading (models), continuous-batching engine
(engine), HTTP app (server)."""
