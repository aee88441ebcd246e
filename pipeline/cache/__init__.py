"""Teacher top-k cache: schema, codec, writer, manifest, reader."""
