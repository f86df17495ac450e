/* metrics: being written. */
