"""The library: corpus, packing, tiny models, teachers, cache, scheduler, evaluation."""
