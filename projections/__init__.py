"""Read models: their projectors (event → SQL), rebuild, and the queries the API runs on them."""
