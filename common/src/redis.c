/* redis: being written. */
