"""Plants: the simulated GPU + vLLM serving plant, recorded replays and real serving."""
