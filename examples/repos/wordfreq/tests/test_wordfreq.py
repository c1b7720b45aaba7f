from wordfreq import top_words


class TestTopWords:
    def setup_method(self, method):
        self.text = "b a b c b a"

    def test_most_frequent_first(self):
        assert top_words(self.text, 1) == [("b", 3)]

    def test_n_limits(self):
        assert len(top_words(self.text, 2)) == 2

    def test_empty(self):
        assert top_words("") == []
