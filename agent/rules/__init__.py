"""The alarm rules: four-level limits, rate, gas detector levels, domain rules (fault, crowding, halt, comm loss)
and daily energy, evaluated on whole reading batches."""
