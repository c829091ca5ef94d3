"""The Spark engine of `recforge data prepare` (data.engine: spark): the local engine's rules as Spark jobs.

Imported only when that engine is chosen, so the local path, training and serving never load pyspark.
"""
