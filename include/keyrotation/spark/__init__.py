"""Reading the lake with Spark: the Transit ``KmsClient`` for parquet-java (``TransitKmsClient.java``, shipped
beside this module) and the settings a reader needs."""
